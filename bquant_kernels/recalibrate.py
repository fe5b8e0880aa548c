"""Recalibration of BatchQuant running ranges (spec 3)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .modules import BatchQuantizer


class _RangeMean:
    """Batch-size-weighted sum of ``[lo, hi]`` kept on the device (float64), and the sample count."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, lo_hi: Tensor, batch_size: int) -> None:
        weighted = lo_hi.detach().double() * batch_size
        self.total = weighted if self.total is None else self.total + weighted
        self.count += batch_size


@contextmanager
def recalibrate(model: nn.Module, *, process_group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Within the block every :class:`BatchQuantizer` of ``model`` quantizes with batch statistics
    (also in eval mode) and accumulates the batch-size-weighted mean of its ``[lo, hi]``.

    On a normal exit each quantizer that saw data gets ``lo_hi`` = that mean; under an initialised
    ``torch.distributed`` the per-rank means are averaged across ranks in one all-reduce. Quantizers
    that saw no data (inactive in the subnet) keep their values. On an exception nothing is written.
    """
    quantizers = [m for m in model.modules() if isinstance(m, BatchQuantizer)]
    sinks = [_RangeMean() for _ in quantizers]
    for q, s in zip(quantizers, sinks, strict=True):
        q.range_sink = s
    try:
        yield
    finally:
        for q in quantizers:
            q.range_sink = None
    seen = [(q, s) for q, s in zip(quantizers, sinks, strict=True) if s.count > 0]
    if not seen and not (dist.is_available() and dist.is_initialized()):
        return
    device = seen[0][0].lo_hi.device if seen else next(model.buffers()).device
    # Rows per quantizer: [mean_lo, mean_hi, has_data]; every rank contributes every quantizer.
    table = torch.zeros(len(quantizers), 3, dtype=torch.float64, device=device)
    for i, s in enumerate(sinks):
        if s.count > 0:
            table[i, :2] = s.total / s.count
            table[i, 2] = 1.0
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(table, group=process_group)
    has = table[:, 2:3]
    means = table[:, :2] / has.clamp(min=1.0)
    finite = torch.isfinite(means).all(dim=1).tolist()  # one sync per recalibration: a NaN range would stay
    if not all(finite):
        names = {m: n for n, m in model.named_modules()}
        bad = [names[q] or "(model)" for q, ok in zip(quantizers, finite, strict=True) if not ok]
        raise ValueError(
            f"recalibrate: the batch range of {len(bad)} BatchQuantizer(s) is not finite (e.g. {bad[0]}): a "
            "calibration batch holds NaN or inf values; check the data (the ranges were left as they were)"
        )
    with torch.no_grad():
        for i, q in enumerate(quantizers):
            if sinks[i].count > 0:
                q.lo_hi.copy_(means[i].to(q.lo_hi.dtype))
                q.calibrated = True
