"""CUDA backend: the kernels of ``csrc/cuda/`` (two launches forward, one backward, no host sync)."""

from __future__ import annotations

import torch

from .. import _ext
from ._native import bind

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEVICES = ("cuda",)


def available() -> tuple[bool, str]:
    if _ext.ext is None:
        return False, _ext.unavailable_reason
    if not _ext.has_cuda():
        return False, "bquant_kernels._C was built without CUDA (no nvcc or a CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, "compiled CUDA kernels (csrc/cuda)"


globals().update(bind("cuda"))
