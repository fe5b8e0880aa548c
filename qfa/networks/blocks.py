"""Inverted-residual blocks of the supernet (dynamic) and of extracted subnets (static)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bquant_kernels import BatchQuantizer

from ..nn import DynamicQConv2d, DynamicQDepthwiseConv2d, QConv2d
from .arch import mid_channels


class ResidualBlock(nn.Module):
    """``conv(x) + x`` with an identity shortcut (full-precision add), else ``conv(x)``.

    A supernet with fused epilogues chains its blocks (:meth:`QFAMobileNetV3.forward`): ``x_in`` is
    then the block's input already quantized for its first layer (``x`` only feeds the shortcut, and
    may be ``None`` without one), and the shortcut's add and the next block's quantizer
    (``next_quantizer``) run in the project conv's fused epilogue; ``keep_activation`` also returns the
    unquantized output for the next block's shortcut: ``(output, quantized output)``.
    """

    def __init__(self, conv: nn.Module, shortcut: bool) -> None:
        super().__init__()
        self.conv = conv
        self.shortcut = shortcut

    def forward(
        self,
        x: Tensor | None,
        x_in: Tensor | None = None,
        *,
        input_quantized: bool = False,
        next_quantizer: BatchQuantizer | None = None,
        keep_activation: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if x_in is None and next_quantizer is None and not keep_activation:
            y = self.conv(x)
            return y + x if self.shortcut else y
        return self.conv(
            x if x_in is None else x_in,
            input_quantized=input_quantized,
            residual=x if self.shortcut else None,
            next_quantizer=next_quantizer,
            keep_activation=keep_activation,
        )

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

    def input_quantizer(self) -> BatchQuantizer | None:
        """The active quantizer of the block's input (its first layer's), None in full precision."""
        first = self.depth_conv if self.inverted_bottleneck is None else self.inverted_bottleneck
        return first.input_quantizer()

    def forward(
        self,
        x: Tensor,
        *,
        input_quantized: bool = False,
        residual: Tensor | None = None,
        next_quantizer: BatchQuantizer | None = None,
        keep_activation: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``next_quantizer(project(depthwise(expand(x))) + residual)``; ``input_quantized``: ``x`` comes
        quantized for the first layer; ``keep_activation``: ``(output, quantized output)``. With fused
        epilogues each layer's output that is exactly the next layer's input is quantized in the same op
        as its BN and activation (after SE: with SE's gate multiply); without, each layer quantizes its own
        input."""
        fused = self.depth_conv.fused_epilogue
        dw_quantizer = self.depth_conv.input_quantizer() if fused else None
        pl_quantizer = self.point_linear.input_quantizer() if fused else None
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x, dw_quantizer, input_quantized=input_quantized)
            input_quantized = dw_quantizer is not None
        x = self.depth_conv(x, pl_quantizer, input_quantized=input_quantized)
        return self.point_linear(
            x,
            next_quantizer,
            input_quantized=pl_quantizer is not None,
            residual=residual,
            keep_activation=keep_activation,
        )

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
