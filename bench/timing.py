"""Median wall time of a callable: ``triton.testing.do_bench`` on a GPU, a repeated-median timer on the CPU."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

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
    to last about 1 ms each until at least ``min_reps`` samples and ``min_total_s`` seconds (or
    ``max_reps`` samples); the median per-call time of the samples is returned.
    """
    device = torch.device(device)
    if min_total_s <= 0 or warmup_s < 0 or min_reps < 1 or max_reps < min_reps:
        raise ValueError(
            f"need min_total_s > 0, warmup_s >= 0, 1 <= min_reps <= max_reps; got "
            f"min_total_s={min_total_s}, warmup_s={warmup_s}, min_reps={min_reps}, max_reps={max_reps}"
        )
    if device.type == "cuda":
        return _time_cuda(fn, device, min_total_s=min_total_s, warmup_s=warmup_s)
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    return _time_cpu(fn, min_total_s=min_total_s, warmup_s=warmup_s, min_reps=min_reps, max_reps=max_reps)


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


def _time_cpu(fn: Callable[[], object], *, min_total_s: float, warmup_s: float, min_reps: int, max_reps: int) -> float:
    fn()  # may compile or allocate: not part of the estimate
    calls, last = 0, 0.0
    start = time.perf_counter()
    while calls < 1 or time.perf_counter() - start < warmup_s:
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
        calls += 1
    # Calls per sample, so that one sample lasts about 1 ms and the timer resolution does not matter.
    per_sample = max(1, math.ceil(1e-3 / max(last, 1e-9)))
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < min_total_s and len(samples) < max_reps):
        t0 = time.perf_counter()
        for _ in range(per_sample):
            fn()
        samples.append((time.perf_counter() - t0) / per_sample)
    return statistics.median(samples)
