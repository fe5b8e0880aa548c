"""Squeeze-and-excitation in full precision, sliced to the active channels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .utils import leading, make_divisible

SE_REDUCTION = 4


def se_mid_channels(channels: int) -> int:
    """Hidden width of the SE block for ``channels`` input channels: ``make_divisible(C // 4, 8)``."""
    return make_divisible(channels // SE_REDUCTION, 8)


class DynamicSE(nn.Module):
    """SE on the first ``C`` of ``max_channels`` channels: pool, 1x1 reduce + ReLU, 1x1 expand + h_sigmoid.

    The hidden width follows the active ``C`` (``make_divisible(C // 4, 8)``), taking the first rows
    and columns of the full weights. Used as is in static subnets (there ``C`` is the full width).
    """

    def __init__(self, max_channels: int) -> None:
        super().__init__()
        self.max_channels = max_channels
        mid = se_mid_channels(max_channels)
        self.reduce = nn.Conv2d(max_channels, mid, 1, bias=True)
        self.expand = nn.Conv2d(mid, max_channels, 1, bias=True)

    def gate(self, x: Tensor) -> Tensor:
        """The ``(N, C, 1, 1)`` multipliers SE applies to ``x`` (``forward`` is ``x * gate(x)``)."""
        c = x.shape[1]
        mid = se_mid_channels(c)
        y = x.mean((2, 3), keepdim=True)
        y = F.relu(F.conv2d(y, leading(self.reduce.weight, mid, c), leading(self.reduce.bias, mid)))
        return F.hardsigmoid(F.conv2d(y, leading(self.expand.weight, c, mid), leading(self.expand.bias, c)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)

    def extra_repr(self) -> str:
        return f"{self.max_channels}, reduction={SE_REDUCTION}"
