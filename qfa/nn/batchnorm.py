"""Batch normalisation for quantized supernets: full precision, sliced to the active channels, no EMA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import leading


class BNStatsSink:
    """Batch-size-weighted sums of per-batch channel means and biased variances (float64, on the device)."""

    def __init__(self) -> None:
        self.mean_sum: Tensor | None = None
        self.var_sum: Tensor | None = None
        self.count = 0
        self.channels = 0

    def add(self, mean: Tensor, var: Tensor, batch_size: int) -> None:
        if self.mean_sum is not None and mean.numel() != self.channels:
            raise RuntimeError(
                f"a BatchNorm layer saw {mean.numel()} channels after {self.channels} within one calibration; "
                "keep the subnet fixed while calibrating"
            )
        m, v = mean.double() * batch_size, var.double() * batch_size
        self.mean_sum = m if self.mean_sum is None else self.mean_sum + m
        self.var_sum = v if self.var_sum is None else self.var_sum + v
        self.count += batch_size
        self.channels = mean.numel()


class DynamicBatchNorm2d(nn.Module):
    """BatchNorm over the first ``C`` channels of its ``max_channels`` (``C`` = the input's channel count).

    Training normalises with the batch statistics and never updates the running statistics (no EMA);
    evaluation uses the running statistics, which only :func:`qfa.calibrate` writes (mean of the
    per-batch means and biased variances of a recalibration pass). Used as is in static subnets.
    """

    def __init__(self, max_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.max_channels = max_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(max_channels))
        self.bias = nn.Parameter(torch.zeros(max_channels))
        self.register_buffer("running_mean", torch.zeros(max_channels))
        self.register_buffer("running_var", torch.ones(max_channels))
        self.stats_sink: BNStatsSink | None = None  # set by qfa.calibrate

    @property
    def uses_batch_stats(self) -> bool:
        """Batch statistics (training, and recalibration) rather than the running ones (evaluation)."""
        return self.training or self.stats_sink is not None

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c > self.max_channels:
            raise ValueError(f"input has {c} channels, this BatchNorm holds {self.max_channels}")
        weight, bias = leading(self.weight, c), leading(self.bias, c)
        if self.stats_sink is not None:
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
            self.stats_sink.add(mean, var, x.shape[0])
        if self.uses_batch_stats:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(
            x, leading(self.running_mean, c), leading(self.running_var, c), weight, bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.max_channels}, eps={self.eps}"
