"""Inverted-residual blocks of the supernet (dynamic) and of extracted subnets (static)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn import DynamicQConv2d, DynamicQDepthwiseConv2d, QConv2d
from .arch import mid_channels


class ResidualBlock(nn.Module):
    """``conv(x) + x`` with an identity shortcut (full-precision add), else ``conv(x)``."""

    def __init__(self, conv: nn.Module, shortcut: bool) -> None:
        super().__init__()
        self.conv = conv
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y + x if self.shortcut else y

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut}"


class DynamicMBConv(nn.Module):
    """1x1 expand (BN, act) -> depthwise kxk (BN, act, SE) -> 1x1 project (BN), all quantized.

    Elastic kernel size (``ks_list``) and expand ratio (``expand_list``: the first
    ``make_divisible(round(C_in * e), 8)`` hidden channels). With ``expand_list == (1,)`` there is no
    expand conv (block 0).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        ks_list: Sequence[int],
        expand_list: Sequence[int],
        stride: int,
        act: str,
        se: bool,
        quant_bits: Sequence[int],
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.expand_list = tuple(sorted(expand_list))
        if self.expand_list == (1,):  # the depthwise conv works on the input directly
            max_mid = in_channels
            self.inverted_bottleneck = None
        else:
            max_mid = self.mid_channels(self.expand_list[-1])
            self.inverted_bottleneck = DynamicQConv2d(in_channels, max_mid, 1, bn=True, act=act, quant_bits=quant_bits)
        self.depth_conv = DynamicQDepthwiseConv2d(max_mid, ks_list, stride, act=act, se=se, quant_bits=quant_bits)
        self.point_linear = DynamicQConv2d(max_mid, out_channels, 1, bn=True, act=None, quant_bits=quant_bits)
        self.active_expand = self.expand_list[-1]

    def mid_channels(self, expand: int) -> int:
        return mid_channels(self.in_channels, expand)

    def set_active(self, ks: int, expand: int) -> None:
        if expand not in self.expand_list:
            raise ValueError(f"e={expand} not in {self.expand_list}")
        self.depth_conv.set_active_kernel_size(ks)
        if self.inverted_bottleneck is not None:
            self.inverted_bottleneck.active_out_channels = self.mid_channels(expand)
        self.active_expand = expand

    def forward(self, x: Tensor) -> Tensor:
        if not self.depth_conv.fused_epilogue:
            if self.inverted_bottleneck is not None:
                x = self.inverted_bottleneck(x)
            return self.point_linear(self.depth_conv(x))
        # Fused epilogues: each layer's output that is exactly the next layer's input is quantized in
        # the same op as its BN and activation (not after SE).
        dw_quantizer = self.depth_conv.input_quantizer()
        pl_quantizer = None if self.depth_conv.se is not None else self.point_linear.input_quantizer()
        dw_input_quantized = False
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x, dw_quantizer)
            dw_input_quantized = dw_quantizer is not None
        x = self.depth_conv(x, pl_quantizer, input_quantized=dw_input_quantized)
        return self.point_linear(x, input_quantized=pl_quantizer is not None)

    @torch.no_grad()
    def to_static(self) -> MBConv:
        mid = self.in_channels if self.inverted_bottleneck is None else self.mid_channels(self.active_expand)
        return MBConv(
            None if self.inverted_bottleneck is None else self.inverted_bottleneck.to_static(self.in_channels),
            self.depth_conv.to_static(mid),
            self.point_linear.to_static(mid),
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, active_expand={self.active_expand}"


class MBConv(nn.Module):
    """Static inverted-residual conv: optional expand, depthwise (with SE), project."""

    def __init__(self, inverted_bottleneck: QConv2d | None, depth_conv: QConv2d, point_linear: QConv2d) -> None:
        super().__init__()
        self.inverted_bottleneck = inverted_bottleneck
        self.depth_conv = depth_conv
        self.point_linear = point_linear

    def forward(self, x: Tensor) -> Tensor:
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))
