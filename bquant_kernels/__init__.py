"""bquant_kernels: fused BatchQuant and LSQ fake-quantization kernels (CPU, CUDA, Triton).

Functional ops: :func:`batchquant`, :func:`batch_range`, :func:`lsq`; :func:`bn_act_quant` (fused
BatchNorm + activation + BatchQuant, docs/epilogue.md);
:func:`gated_batchquant` (``batchquant(x * gate)``, a squeeze-excitation's output, in one op).
Modules: :class:`BatchQuantizer`, :class:`LSQQuantizer` (:func:`lsq_quantize_weights` for many at once);
:func:`recalibrate`.
Backends: :func:`backends` reports what is available here.
"""

from . import extension  # noqa: F401  (loads the compiled extension, warns once if it is missing)
from .backends import backends
from .epilogue import bn_act_quant
from .gated import gated_batchquant
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
    "bn_act_quant",
    "gated_batchquant",
    "lsq",
    "lsq_grad_scale",
    "lsq_multi",
    "lsq_quantize_weights",
    "recalibrate",
]
