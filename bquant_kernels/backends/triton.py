"""Triton backend: the kernels of ``bquant_kernels/triton`` (two launches forward, one backward,
no host sync). Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (Triton's NumPy interpreter: slow, for tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_kernels = None
_missing_reason = ""
try:
    from .. import triton as _kernels
except ImportError as err:  # triton not installed (or not importable here)
    _missing_reason = f"triton cannot be imported ({err})"

INTERPRET: bool = _kernels is not None and _kernels.INTERPRET
DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)


def available() -> tuple[bool, str]:
    if _kernels is None:
        return False, _missing_reason
    if INTERPRET:
        return True, "Triton kernels (bquant_kernels/triton) under the CPU interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, slowly)"
    return True, "Triton kernels (bquant_kernels/triton)"


def _unavailable(name: str) -> Callable:
    def missing(*_args, **_kwargs):
        raise RuntimeError(f"the triton backend's {name} cannot run: {_missing_reason}")

    return missing


_NAMES = ("batch_range", "batchquant_forward", "batchquant_backward", "lsq_forward", "lsq_backward")
if _kernels is None:
    globals().update({name: _unavailable(name) for name in _NAMES})
else:
    batch_range = _kernels.batch_range
    batchquant_forward = _kernels.batchquant_forward
    batchquant_backward = _kernels.batchquant_backward
    lsq_forward = _kernels.lsq_forward
    lsq_backward = _kernels.lsq_backward
