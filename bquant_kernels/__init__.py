"""bquant_kernels: fused BatchQuant and LSQ fake-quantization kernels (CPU, CUDA, Triton).

Functional ops: :func:`batchquant`, :func:`batch_range`, :func:`lsq`.
Modules: :class:`BatchQuantizer`, :class:`LSQQuantizer` (:func:`lsq_quantize_weights` for many at once);
:func:`recalibrate`.
Backends: :func:`backends` reports what is available here.
"""

from . import extension  # noqa: F401  (loads the compiled extension, warns once if it is missing)
from .backends import backends
from .lsq_multi import lsq_multi
from .modules import BatchQuantizer, LSQQuantizer, lsq_quantize_weights
from .ops import batch_range, batchquant, lsq, lsq_grad_scale
from .recalibrate import recalibrate

__version__ = "0.1.0"

__all__ = [
    "BatchQuantizer",
    "LSQQuantizer",
    "backends",
    "batch_range",
    "batchquant",
    "lsq",
    "lsq_grad_scale",
    "lsq_multi",
    "lsq_quantize_weights",
    "recalibrate",
]
