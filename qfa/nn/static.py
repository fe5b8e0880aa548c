"""Static quantized layers: what :meth:`QFAMobileNetV3.get_active_subnet` builds.

Fixed shapes and bit-widths; each holds at most one weight quantizer (``LSQQuantizer``) and one
input quantizer (``BatchQuantizer``), ``None`` where the bit-width is 32. BN and SE are the same
full-precision modules as in the supernet (their slicing is the identity here), so the static
subnet is recalibrated with :func:`qfa.calibrate` just like the supernet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bquant_kernels import BatchQuantizer, LSQQuantizer

from .batchnorm import DynamicBatchNorm2d
from .quantizers import FULL_PRECISION
from .se import DynamicSE
from .utils import build_activation


class _FixedBits(nn.Module):
    """A layer with fixed bit-widths: its weight and input quantizers, ``None`` where the bit-width is 32."""

    weight: nn.Parameter

    def _init_quantizers(self, w_bits: int, a_bits: int, backend: str | None) -> None:
        self.w_bits, self.a_bits = w_bits, a_bits
        self.w_quantizer = None if w_bits == FULL_PRECISION else LSQQuantizer(w_bits, signed=True, backend=backend)
        self.a_quantizer = None if a_bits == FULL_PRECISION else BatchQuantizer(a_bits, signed=False, backend=backend)

    def _quantized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(input, weight)``, each fake-quantized unless its bit-width is 32."""
        w = self.weight
        if self.a_quantizer is not None:
            x = self.a_quantizer(x)
        if self.w_quantizer is not None:
            w = self.w_quantizer(w)
        return x, w


class QConv2d(_FixedBits):
    """Input BatchQuant -> conv with LSQ weight -> BN -> activation -> SE (dense or depthwise)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        w_bits: int,
        a_bits: int,
        bn: bool = True,
        act: str | None = None,
        se: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self._init_quantizers(w_bits, a_bits, backend)
        self.bn = DynamicBatchNorm2d(out_channels) if bn else None
        self.act = build_activation(act)
        self.se = DynamicSE(out_channels) if se else None

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._quantized(x)
        y = F.conv2d(x, w, None, self.stride, self.padding, 1, self.groups)
        if self.bn is not None:
            y = self.bn(y)
        y = self.act(y)
        return y if self.se is None else self.se(y)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, w_bits={self.w_bits}, a_bits={self.a_bits}"
        )


class QLinear(_FixedBits):
    """Input BatchQuant -> linear with LSQ weight and a full-precision bias."""

    def __init__(
        self, in_features: int, out_features: int, *, w_bits: int, a_bits: int, backend: str | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self._init_quantizers(w_bits, a_bits, backend)

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._quantized(x)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}"
