"""Triton backend: the kernels in this folder (two launches forward, one backward, no host sync).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (Triton's NumPy interpreter: slow, for tests). The per-element math mirrors
``csrc/common/quant_math.h``. Kernel modules: ``batchquant.py``, ``lsq.py``, ``epilogue.py``, ``gated.py``;
their shared pieces: ``quant_math.py`` (element math), ``reductions.py``, ``rounding.py``, ``launch.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "DEVICES",
    "DTYPES",
    "available",
    "batch_range",
    "batchquant_backward",
    "batchquant_forward",
    "bn_act_quant_backward",
    "bn_act_quant_forward",
    "gated_batchquant_backward",
    "gated_batchquant_forward",
    "lsq_backward",
    "lsq_forward",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_missing_reason = ""
try:
    from .batchquant import batch_range, batchquant_backward, batchquant_forward
    from .epilogue import bn_act_quant_backward, bn_act_quant_forward
    from .gated import gated_batchquant_backward, gated_batchquant_forward
    from .launch import INTERPRET
    from .lsq import lsq_backward, lsq_forward
except ImportError as err:  # triton not installed (or not importable here): available() says why
    _missing_reason = f"triton cannot be imported ({err})"
    INTERPRET = False

    def _unavailable(name: str) -> Callable[..., None]:
        def missing(*_args, **_kwargs) -> None:
            raise RuntimeError(f"the triton backend's {name} cannot run: {_missing_reason}")

        return missing

    batch_range = _unavailable("batch_range")
    batchquant_forward = _unavailable("batchquant_forward")
    batchquant_backward = _unavailable("batchquant_backward")
    lsq_forward = _unavailable("lsq_forward")
    lsq_backward = _unavailable("lsq_backward")
    bn_act_quant_forward = _unavailable("bn_act_quant_forward")
    bn_act_quant_backward = _unavailable("bn_act_quant_backward")
    gated_batchquant_forward = _unavailable("gated_batchquant_forward")
    gated_batchquant_backward = _unavailable("gated_batchquant_backward")


DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)


def available() -> tuple[bool, str]:
    if _missing_reason:
        return False, _missing_reason
    if INTERPRET:
        return True, "Triton kernels (bquant_kernels/backends/triton) under the CPU interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, slowly)"
    return True, "Triton kernels (bquant_kernels/backends/triton)"
