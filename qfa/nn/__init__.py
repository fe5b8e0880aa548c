"""Quantized layers of the QFA supernet (dynamic) and of its extracted subnets (static)."""

from .batchnorm import BNStatsSink, DynamicBatchNorm2d
from .dynamic import DynamicQConv2d, DynamicQDepthwiseConv2d, DynamicQLinear
from .quantizers import FULL_PRECISION, HEAD_MIN_BITS, BackendOwner, bank_bits, quantized_weights
from .se import DynamicSE, se_mid_channels
from .static import QConv2d, QLinear
from .utils import make_divisible

__all__ = [
    "FULL_PRECISION",
    "HEAD_MIN_BITS",
    "BNStatsSink",
    "BackendOwner",
    "DynamicBatchNorm2d",
    "DynamicQConv2d",
    "DynamicQDepthwiseConv2d",
    "DynamicQLinear",
    "DynamicSE",
    "QConv2d",
    "QLinear",
    "bank_bits",
    "make_divisible",
    "quantized_weights",
    "se_mid_channels",
]
