"""CUDA backend: the kernels of ``csrc/cuda/`` behind the native ops ``torch.ops.bquant.native_*``
(two launches forward, one backward, no host sync)."""

from __future__ import annotations

import torch

from .. import extension

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEVICES = ("cuda",)


def available() -> tuple[bool, str]:
    if extension.ext is None:
        return False, extension.unavailable_reason
    if not extension.has_cuda():
        return False, "bquant_kernels._C was built without CUDA (no nvcc or a CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, "compiled CUDA kernels (csrc/cuda)"
