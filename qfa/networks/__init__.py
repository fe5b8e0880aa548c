"""Networks: the QFA MobileNetV3 supernet, its architecture description and static subnets."""

from .arch import MobileNetV3Arch
from .mobilenetv3 import QFAMobileNetV3
from .subnet import MobileNetV3Subnet

__all__ = ["MobileNetV3Arch", "MobileNetV3Subnet", "QFAMobileNetV3"]
