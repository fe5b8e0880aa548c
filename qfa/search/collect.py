"""Collection of (subnet, measured accuracy, cost) samples for the accuracy predictor (spec 6).

Sample ``i`` of a run is drawn from its own generator (:func:`sample_rng`), recalibrated and
evaluated on the held-out split, and appended as one JSON line. The run is resumable: indices
already in the file are skipped. Under torchrun, rank ``r`` of ``W`` takes the indices ``i`` with
``i % W == r``; ranks share nothing but the output file (appends are locked), and never average
statistics with each other: each evaluates its own subnets on the whole held-out split.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

import qfa
from qfa.search.checks import check_at_least
from qfa.search.records import append_records, read_records, space_id
from qfa.search.sampling import SamplingMix, sample_config, sample_rng
from qfa.search.space import space_to_dict

METRICS = ("top1", "top5", "loss")


@dataclass(frozen=True)
class CollectSettings:
    num_samples: int
    seed: int = 0
    mix: SamplingMix = field(default_factory=SamplingMix)
    num_calib_batches: int = 30

    def __post_init__(self) -> None:
        check_at_least(self, num_samples=1, num_calib_batches=1)

    def sampling(self) -> dict[str, Any]:
        """What decides the samples besides the seed: stored in every record, checked on resume."""
        return {**asdict(self.mix), "num_calib_batches": self.num_calib_batches}


def pending_indices(
    path: str | os.PathLike,
    settings: CollectSettings,
    space: Any,
    rank: int = 0,
    world_size: int = 1,
    supernet: str | None = None,
) -> list[int]:
    """Indices this rank still has to collect (checks that the file belongs to the same run)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    sid = space_id(space)
    sampling = settings.sampling()
    done = set()
    for rec in read_records(path):
        if rec.get("space_id") != sid:
            raise ValueError(
                f"{path} holds samples of another supernet search space (space_id {rec.get('space_id')}, "
                f"this one is {sid}); use another --out"
            )
        if supernet is not None and rec.get("supernet", supernet) != supernet:
            raise ValueError(
                f"{path} holds samples of another supernet (weights {rec['supernet']}, this one is {supernet}); "
                "use another --out"
            )
        if rec.get("seed") != settings.seed:
            raise ValueError(
                f"{path} holds samples drawn with seed {rec.get('seed')}; resume with --seed {rec.get('seed')} "
                "or write to another --out"
            )
        # Records written before the settings were stored have none: nothing to compare.
        stored = rec.get("sampling", sampling)
        if stored != sampling:
            differ = {k: v for k, v in stored.items() if sampling.get(k) != v}
            raise ValueError(
                f"{path} holds samples drawn with {differ} (this run: "
                f"{ {k: sampling.get(k) for k in differ} }); resume with the same settings or "
                "write to another --out"
            )
        done.add(int(rec["index"]))
    return [i for i in range(rank, settings.num_samples, world_size) if i not in done]


def measure_sample(
    model: nn.Module,
    index: int,
    settings: CollectSettings,
    calib_loader: Iterable,
    val_loader: Iterable,
    cost_model: Any,
) -> dict[str, Any]:
    """Draw sample ``index``, recalibrate and evaluate it, and return its record (with every metric of
    ``cost_model``: both LUT-FLOPs where the published one is defined)."""
    space = space_to_dict(model.space)
    cfg = sample_config(model.space, sample_rng(settings.seed, index), settings.mix)
    start = time.perf_counter()
    metrics = qfa.evaluate_subnet(model, cfg, calib_loader, val_loader, num_calib_batches=settings.num_calib_batches)
    record: dict[str, Any] = {
        "index": index,
        "seed": settings.seed,
        "sampling": settings.sampling(),
        "space_id": space_id(space),
        "space": space,
        "config": cfg.to_dict(),
        "images": int(metrics["n"]),
        "eval_seconds": round(time.perf_counter() - start, 3),
    }
    record.update({k: float(metrics[k]) for k in METRICS})
    record.update({k: float(v[0]) for k, v in cost_model.evaluate_batch([cfg]).items()})
    return record


def collect_samples(
    model: nn.Module,
    path: str | os.PathLike,
    calib_loader: Iterable,
    val_loader: Iterable,
    settings: CollectSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    cost_model: qfa.cost.CostModel | None = None,
    supernet: str | None = None,
) -> int:
    """Collect this rank's pending samples into ``path``; returns how many were added. ``cost_model``:
    the costs recorded (default ``CostModel(model)``; e.g. one with a user's FLOPs table). ``supernet``:
    the weights' fingerprint (:func:`qfa.checkpoint.weights_id`), stored in every record."""
    todo = pending_indices(path, settings, model.space, rank, world_size, supernet)
    cost_model = cost_model or qfa.cost.CostModel(model)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"collect (rank {rank})" if world_size > 1 else "collect", unit="subnet")
    try:
        for i in todo:
            record = measure_sample(model, i, settings, calib_loader, val_loader, cost_model)
            if supernet is not None:
                record["supernet"] = supernet
            append_records(path, [record])  # one line per subnet: a kill loses at most the current one
            if bar is not None:
                bar.update(1)
                bar.set_postfix(top1=f"{record['top1']:.2f}", mflops=f"{record['lut_flops'] / 1e6:.2f}")
    finally:
        if bar is not None:
            bar.close()
    return len(todo)
