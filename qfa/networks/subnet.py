"""``MobileNetV3Subnet``: a standalone static quantized network extracted from the supernet."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SubnetConfig
from ..nn import BackendOwner, QConv2d, QLinear
from .arch import IN_CHANNELS
from .blocks import ResidualBlock


def check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != IN_CHANNELS:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"input must be an (N, {IN_CHANNELS}, H, W) image batch, got {shape}")


class MobileNetV3Subnet(BackendOwner):
    """Static QFA MobileNetV3 subnet: stem, the active blocks, head; fixed shapes and bit-widths.

    Module names follow the supernet (``blocks.<i>.conv.depth_conv`` ...), with the active blocks
    renumbered. ``config`` is the :class:`SubnetConfig` it was extracted for. BN running statistics
    and BatchQuant ranges are recalibrated with :func:`qfa.calibrate` like the supernet's.
    ``backend``: the bquant_kernels backend of its quantizers (the supernet's when extracted).
    """

    def __init__(
        self,
        first_conv: QConv2d,
        blocks: list[ResidualBlock],
        final_expand_layer: QConv2d,
        feature_mix_layer: QConv2d,
        dropout: float,
        classifier: QLinear,
        config: SubnetConfig,
    ) -> None:
        super().__init__()
        self.first_conv = first_conv
        self.blocks = nn.ModuleList(blocks)
        self.final_expand_layer = final_expand_layer
        self.feature_mix_layer = feature_mix_layer
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        x = self.first_conv(x)
        for block in self.blocks:
            x = block(x)
        x = self.final_expand_layer(x)
        x = self.feature_mix_layer(x.mean((2, 3), keepdim=True))
        return self.classifier(self.dropout(torch.flatten(x, 1)))
