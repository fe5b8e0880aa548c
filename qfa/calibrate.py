"""Recalibration of the active subnet's BN and BatchQuant statistics (spec 3, batchquant.md 3)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import bquant_kernels

from .nn.batchnorm import BNStatsSink, DynamicBatchNorm2d


def resize(images: Tensor, resolution: int | None) -> Tensor:
    """``images`` resized to ``resolution`` x ``resolution`` (bilinear, antialiased when shrinking), if needed."""
    if resolution is None or tuple(images.shape[-2:]) == (resolution, resolution):
        return images
    shrink = resolution < images.shape[-1]
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _check_common(model: object, loader: object, resolution: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of (images, labels), got {type(loader).__name__}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader: Iterable,
    num_batches: int = 30,
    resolution: int | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Recalibrate, in place, the BN running statistics and BatchQuant running ranges of the active subnet.

    Runs ``num_batches`` batches of ``loader`` (``(images, labels)``; images resized to ``resolution``
    when given) with batch statistics in use, then sets for every layer that saw data:
    BN ``running_mean`` / ``running_var`` of the active channels to the batch-size-weighted mean of
    the per-batch means / biased variances, and each active BatchQuantizer's ``lo_hi`` to the
    weighted mean of its batch ranges (``bquant_kernels.recalibrate``). Inactive layers and channels
    keep their values. Under torch.distributed the per-rank means are averaged across ranks (one
    batched all-reduce for BN). Statistics accumulate on the device; nothing is copied. Works on the
    supernet and on static subnets; leaves ``model`` in eval mode and returns it.
    """
    _check_common(model, loader, resolution)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    device = model_device(model)
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, DynamicBatchNorm2d)]
    sinks = [BNStatsSink() for _ in bns]
    seen = 0
    try:
        for bn, sink in zip(bns, sinks, strict=True):
            bn.stats_sink = sink
        with bquant_kernels.recalibrate(model, process_group=process_group):
            for batch in islice(loader, num_batches):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(resize(images.to(device, non_blocking=True), resolution))
                seen += 1
    finally:
        for bn in bns:
            bn.stats_sink = None
    if seen == 0:
        raise ValueError("loader yielded no batches: nothing to calibrate")
    _write_bn_stats(bns, sinks, device, process_group)
    return model


def _write_bn_stats(
    bns: list[DynamicBatchNorm2d], sinks: list[BNStatsSink], device: torch.device, group: dist.ProcessGroup | None
) -> None:
    used = [(bn, s) for bn, s in zip(bns, sinks, strict=True) if s.count > 0]
    if not used:
        return
    # One flat float64 buffer: per layer [mean (C), var (C)], then one has-data flag per layer.
    parts = [torch.cat([s.mean_sum / s.count, s.var_sum / s.count]) for _, s in used]
    flat = torch.cat([*parts, torch.ones(len(used), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, group=group)
    ranks = flat[-len(used) :].clamp(min=1.0)
    offset = 0
    for i, (bn, s) in enumerate(used):
        c = s.channels
        block = flat[offset : offset + 2 * c] / ranks[i]
        bn.running_mean[:c].copy_(block[:c])
        bn.running_var[:c].copy_(block[c:])
        offset += 2 * c
