"""Fused CPU backend: the kernels of ``csrc/cpu/`` behind the native ops ``torch.ops.bquant.native_*``
(one pass for the statistics, one for the quantization, one for the backward; parallel, vectorized,
deterministic for any thread count)."""

from __future__ import annotations

import torch

from .. import extension

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cpu",)


def available() -> tuple[bool, str]:
    if extension.ext is None:
        return False, extension.unavailable_reason
    return True, "compiled C++ kernels (csrc/cpu)"
