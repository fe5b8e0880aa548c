"""Median wall time of a callable: ``triton.testing.do_bench`` on a GPU, a repeated-median timer on the CPU."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def time_fn(
    fn: Callable[[], object],
    *,
    device: str | torch.device,
    min_total_s: float = 0.5,
    warmup_s: float = 0.1,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> float:
    """Median seconds per call of ``fn()``, after warm-up.

    On CUDA this is ``triton.testing.do_bench`` (L2 flushed between calls, ``warmup`` and ``rep``
    derived from ``warmup_s`` and ``min_total_s``). On the CPU, ``fn`` is called until ``warmup_s``
    has passed (at least twice: the first call may compile), then timed in samples of enough calls
    to last about ``SAMPLE_S`` each until at least ``min_reps`` samples and ``min_total_s`` seconds (or
    ``max_reps`` samples); the median per-call time of the samples is returned.
    """
    device = torch.device(device)
    _check_budget(min_total_s, warmup_s, min_reps, max_reps)
    if device.type == "cuda":
        return _time_cuda(fn, device, min_total_s=min_total_s, warmup_s=warmup_s)
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    budget = {"min_total_s": min_total_s, "warmup_s": warmup_s, "min_reps": min_reps, "max_reps": max_reps}
    return time_cpu_interleaved({"fn": fn}, **budget)["fn"]


def _check_budget(min_total_s: float, warmup_s: float, min_reps: int, max_reps: int) -> None:
    if min_total_s <= 0 or warmup_s < 0 or min_reps < 1 or max_reps < min_reps:
        raise ValueError(
            f"need min_total_s > 0, warmup_s >= 0, 1 <= min_reps <= max_reps; got "
            f"min_total_s={min_total_s}, warmup_s={warmup_s}, min_reps={min_reps}, max_reps={max_reps}"
        )


def _time_cuda(fn: Callable[[], object], device: torch.device, *, min_total_s: float, warmup_s: float) -> float:
    from triton.testing import do_bench

    with torch.cuda.device(device):
        warmup_ms, rep_ms = max(1, round(warmup_s * 1e3)), max(1, round(min_total_s * 1e3))
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return ms * 1e-3


def time_cuda_graph(
    fn: Callable[[], object], *, device: str | torch.device, min_total_s: float = 0.5, warmup_s: float = 0.1
) -> float:
    """Median seconds per replay of ``fn`` captured once in a CUDA graph (``triton.testing.do_bench``).

    This is the device time alone: the host's launch overhead, which the per-call timing of
    :func:`time_fn` includes whenever it exceeds the GPU time, is gone. ``fn`` must be capturable (no
    host syncs); it is run three times on a side stream first (allocator, autotuning, compilation).
    """
    from triton.testing import do_bench

    device = torch.device(device)
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        warmup_ms, rep_ms = max(1, round(warmup_s * 1e3)), max(1, round(min_total_s * 1e3))
        ms = do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return ms * 1e-3


def time_cpu_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    min_total_s: float = 0.5,
    warmup_s: float = 0.1,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> dict[str, float]:
    """Median seconds per call of each of ``fns`` on the CPU, their samples taken in turn.

    Each callable is warmed up (at least two calls: the first may compile or allocate), then timed
    in samples of enough calls to last about ``SAMPLE_S``; one round takes one sample of each, in a rotating
    order, until every callable has ``min_reps`` samples and ``min_total_s`` seconds of them (or
    ``max_reps``). On a shared machine whose speed drifts (a descheduled vCPU, a neighbour's load),
    interleaving gives every callable the same conditions, so the ratios of the medians stay
    meaningful where timing one callable after the other would not.
    """
    _check_budget(min_total_s, warmup_s, min_reps, max_reps)
    names = list(fns)
    per_sample = {name: _calls_per_sample(fns[name], warmup_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    rounds = 0
    while rounds < min_reps or (min(spent.values()) < min_total_s and rounds < max_reps):
        for i in range(len(names)):
            name = names[(rounds + i) % len(names)]
            fn, calls = fns[name], per_sample[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - t0
            samples[name].append(elapsed / calls)
            spent[name] += elapsed
        rounds += 1
    return {name: statistics.median(samples[name]) for name in names}


# Length of one CPU sample. Long enough that the first call of a sample, slower after the switch
# from another callable (cold caches), weighs little: with 1 ms samples of a ~250 us call the
# ratios between implementations moved by up to 25%.
SAMPLE_S = 5e-3


def _calls_per_sample(fn: Callable[[], object], warmup_s: float) -> int:
    """Warm ``fn`` up for ``warmup_s`` (two calls at least); calls that make a sample of about ``SAMPLE_S``."""
    fn()  # may compile or allocate: not part of the estimate
    calls, last = 0, 0.0
    start = time.perf_counter()
    while calls < 1 or time.perf_counter() - start < warmup_s:
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
        calls += 1
    return max(1, math.ceil(SAMPLE_S / max(last, 1e-9)))
