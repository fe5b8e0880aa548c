"""Exact re-evaluation of a predicted Pareto front, with early stopping (spec 6).

Candidates are measured cheapest first (recalibrate, then top-1 on the held-out split, batch by
batch). While a candidate is being measured, if even an optimistic bound on its accuracy (the
Wilson upper bound at ``z`` standard errors) is below the accuracy of an already measured candidate
that costs no more, it is dominated and its evaluation stops. The published search did the same
with a per-batch tolerance; the Wilson bound needs no precomputed table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import qfa
from qfa.calibrate import resize  # the resize qfa.evaluate uses
from qfa.search.checks import check_at_least
from qfa.search.nsga import non_dominated


@dataclass(frozen=True)
class EarlyStop:
    """``z``: standard errors of the Wilson bound (``None`` disables early stopping);
    ``min_images``: never stop before this many images."""

    z: float | None = 3.0
    min_images: int = 64

    def __post_init__(self) -> None:
        if self.z is not None and not self.z > 0:
            raise ValueError(f"early-stop z must be > 0 (or None to disable), got {self.z}")
        check_at_least(self, min_images=1)


def wilson_upper(correct: int, n: int, z: float) -> float:
    """Upper end of the Wilson score interval of a binomial proportion."""
    if n <= 0:
        return 1.0
    p = correct / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, max(p, (centre + spread) / (1 + z2 / n)))  # max: float rounding at p = 1


@torch.no_grad()
def _streaming_top1(
    model: nn.Module, loader: Iterable, resolution: int | None, stop_below: float | None, rule: EarlyStop
) -> tuple[int, int, bool]:
    """(correct, images, stopped): top-1 hits over ``loader``, stopping once provably below ``stop_below``."""
    correct_t: torch.Tensor | None = None
    n = 0
    for images, labels in loader:
        if resolution is not None:
            images = resize(images, resolution)
        hits = (model(images).argmax(dim=1) == labels).sum()
        correct_t = hits if correct_t is None else correct_t + hits
        n += labels.shape[0]
        if stop_below is not None and rule.z is not None and n >= rule.min_images:
            # One host sync per batch: the decision to go on needs the count (evaluation, not a hot path).
            if wilson_upper(int(correct_t), n, rule.z) < stop_below:
                return int(correct_t), n, True
    return (0 if correct_t is None else int(correct_t)), n, False


def reevaluate_front(
    model: nn.Module,
    configs: Sequence[Any],
    costs: Sequence[float],
    calib_loader: Iterable,
    val_loader: Iterable,
    *,
    num_calib_batches: int = 30,
    early_stop: EarlyStop | None = None,
    accuracy_scale: float = 100.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Measure each config for real; returns one entry per input config (same order). ``costs``: each
    config's cost in the search's metric (e.g. LUT-FLOPs): the order of measurement and of dominance.

    Entry keys: ``measured_top1`` (in units of ``accuracy_scale``; the partial value when stopped),
    ``images``, ``status`` (``"measured"`` or ``"dominated"``: stopped early) and ``eval_seconds``.
    """
    rule = early_stop or EarlyStop()
    if len(configs) != len(costs):
        raise ValueError(f"{len(configs)} configs but {len(costs)} cost values")
    flops = np.asarray(costs, dtype=np.float64)
    results: list[dict[str, Any] | None] = [None] * len(configs)
    measured: list[tuple[float, float]] = []  # (cost, top1 fraction) of fully measured candidates
    order = np.argsort(flops, kind="stable")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc="re-evaluate", unit="subnet")
    was_training = model.training
    try:
        for i in order.tolist():
            cfg = configs[i]
            start = time.perf_counter()
            model.set_active_config(cfg)
            qfa.calibrate(model, calib_loader, num_batches=num_calib_batches, resolution=cfg.resolution)
            model.eval()
            cheaper = [acc for f, acc in measured if f <= flops[i]]
            stop_below = max(cheaper) if cheaper else None
            correct, n, stopped = _streaming_top1(model, val_loader, cfg.resolution, stop_below, rule)
            top1 = correct / max(n, 1)
            if not stopped:
                measured.append((float(flops[i]), top1))
            results[i] = {
                "measured_top1": top1 * accuracy_scale,
                "images": n,
                "status": "dominated" if stopped else "measured",
                "eval_seconds": time.perf_counter() - start,
            }
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return [r for r in results if r is not None]


def measured_front(entries: Sequence[dict[str, Any]], metric: str = "lut_flops") -> list[int]:
    """Indices of fully measured entries that are non-dominated in (measured top-1 up, ``metric`` down)."""
    idx = [i for i, e in enumerate(entries) if e.get("status") == "measured"]
    if not idx:
        return []
    obj = np.array([[-entries[i]["measured_top1"], entries[i][metric]] for i in idx], dtype=np.float64)
    keep = non_dominated(obj)
    return sorted((idx[k] for k in keep), key=lambda i: entries[i][metric])
