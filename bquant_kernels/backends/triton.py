"""Triton backend (placeholder until bquant_kernels/triton/ lands)."""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEVICES = ("cuda",)


def available() -> tuple[bool, str]:
    return False, "the Triton kernels are not written yet"
