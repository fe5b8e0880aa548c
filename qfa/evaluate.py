"""Evaluation of the active subnet: top-1 / top-5 accuracy and cross-entropy."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .calibrate import _check_common, calibrate, model_device, resize
from .config import SubnetConfig


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    resolution: int | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` (eval mode) on ``loader`` of ``(images, labels)``, resized to ``resolution`` if given.

    Returns ``{"top1", "top5"}`` in percent, ``"loss"`` (mean cross-entropy) and ``"n"`` (images).
    Counts accumulate on the device (one host sync at the end); under torch.distributed they are
    summed over the ranks of ``process_group`` (default: all), each rank evaluating its own shard.
    """
    _check_common(model, loader, resolution)
    device = model_device(model)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, n
    for images, labels in loader:
        images = resize(images.to(device, non_blocking=True), resolution)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        totals += torch.stack(
            [
                hits[:, 0].sum(dtype=torch.float64),
                hits.any(dim=1).sum(dtype=torch.float64),
                F.cross_entropy(logits.float(), labels, reduction="sum").double(),
                torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=device),
            ]
        )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, group=process_group)
    correct1, correct5, loss_sum, n = totals.tolist()
    if n == 0:
        raise ValueError("loader yielded no batches: nothing to evaluate")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": int(n)}


def evaluate_subnet(
    model: nn.Module,
    cfg: SubnetConfig,
    calib_loader: Iterable,
    val_loader: Iterable,
    num_calib_batches: int = 30,
) -> dict[str, float]:
    """Activate ``cfg`` on the supernet, recalibrate it on ``calib_loader`` and evaluate it on
    ``val_loader``, both at ``cfg.resolution`` (when set). Returns :func:`evaluate`'s dict."""
    if not isinstance(cfg, SubnetConfig):
        raise TypeError(f"cfg must be a SubnetConfig, got {type(cfg).__name__}")
    model.set_active_config(cfg)
    calibrate(model, calib_loader, num_batches=num_calib_batches, resolution=cfg.resolution)
    return evaluate(model, val_loader, resolution=cfg.resolution)
