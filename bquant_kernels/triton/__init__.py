"""Triton kernels for BatchQuant and LSQ (GPU; the CPU through ``TRITON_INTERPRET=1``).

The backend contract they implement is in ``bquant_kernels/backends/__init__.py``; the per-element
math mirrors ``csrc/common/quant_math.h``. Importing this package imports ``triton``.
"""

from .batchquant import batch_range, batchquant_backward, batchquant_forward
from .launch import INTERPRET
from .lsq import lsq_backward, lsq_forward

__all__ = ["INTERPRET", "batch_range", "batchquant_backward", "batchquant_forward", "lsq_backward", "lsq_forward"]
