"""Fused CPU backend: the kernels of ``csrc/cpu/`` (one pass for the statistics, one for the
quantization, one for the backward; parallel, vectorized, deterministic for any thread count)."""

from __future__ import annotations

import torch

from .. import _ext
from ._native import bind

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cpu",)


def available() -> tuple[bool, str]:
    if _ext.ext is None:
        return False, _ext.unavailable_reason
    return True, "compiled C++ kernels (csrc/cpu)"


globals().update(bind("cpu"))
