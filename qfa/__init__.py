"""qfa: the Quantized-for-all (QFA) MobileNetV3 supernet library (see docs/qfa-api.md)."""

from . import checkpoint, cost
from .calibrate import calibrate
from .config import SubnetConfig
from .evaluate import evaluate, evaluate_subnet
from .networks import MobileNetV3Subnet, QFAMobileNetV3
from .space import SearchSpace

__all__ = [
    "MobileNetV3Subnet",
    "QFAMobileNetV3",
    "SearchSpace",
    "SubnetConfig",
    "calibrate",
    "checkpoint",
    "cost",
    "evaluate",
    "evaluate_subnet",
]
