"""How the Triton kernels are launched: interpreter detection, autotuning, grid sizing, device guard."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
import triton.testing


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# TRITON_INTERPRET=1 (read when triton is imported) runs the kernels on CPU tensors with NumPy.
INTERPRET: bool = _interpreting()


# Block sizes of the element passes (autotuned on a GPU). Under the interpreter a program costs
# Python time per jit-function call, so test-sized tensors get one or two large programs.
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
ELEMENTWISE_INTERPRET = triton.Config({"BLOCK": 1024})
# Partials per iteration of the one-program finishing kernels (float64 accumulators); a constexpr
# global, which the kernels of batchquant.py and lsq.py read as such.
FINISH_BLOCK: tl.constexpr = tl.constexpr(1024)


def size_class(n: int) -> int:
    """The autotuning key for a problem of ``n`` elements: the next power of two, so that the
    many distinct shapes of an elastic supernet share a handful of tuning runs."""
    return 1 << max(n - 1, 0).bit_length()


def _quick_bench(kernel_call: Callable[[], Any], quantiles: Sequence[float]) -> Any:
    # Memory-bound kernels settle fast; triton's default (25 ms warmup + 100 ms) per config and
    # shape would add seconds of tuning to the first step of an elastic-width training run.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


class _FixedConfig:
    """A kernel launched with one fixed config, indexable like an autotuned kernel (``k[grid](...)``)."""

    def __init__(self, fn: triton.JITFunction, config: triton.Config) -> None:
        self.fn = fn
        self.config = config

    def __getitem__(self, grid: Callable[[dict], tuple[int, ...]] | tuple[int, ...]) -> Callable[..., Any]:
        meta = dict(self.config.kwargs)

        def launch(*args: Any, **kwargs: Any) -> Any:
            resolved = grid({**kwargs, **meta}) if callable(grid) else grid
            return self.fn[resolved](*args, **kwargs, **meta, num_warps=self.config.num_warps)

        return launch


def tuned(configs: list[triton.Config], key: list[str], interpret: triton.Config) -> Callable:
    """Decorator: ``triton.autotune`` over ``configs`` keyed on ``key`` on a GPU; under the
    interpreter (no benchmarking possible, and every extra program costs Python time) the single
    ``interpret`` config. Kernels wrapped here must be safe to re-run: they write (never
    accumulate into) their outputs, so autotuning's repeated launches leave the same result."""

    def wrap(fn: triton.JITFunction) -> Any:
        if INTERPRET:
            return _FixedConfig(fn, interpret)
        return triton.autotune(configs=configs, key=key, do_bench=_quick_bench)(fn)

    return wrap


# The tuning of every element-wise kernel (one program per BLOCK elements, keyed on the size class).
elementwise_tuned = tuned(ELEMENTWISE_CONFIGS, key=["size_class"], interpret=ELEMENTWISE_INTERPRET)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid aims for: enough to fill the GPU a few times over.

    Under the interpreter programs run one after the other, so two are enough (more than one, so
    that the multi-program partial/finish path is what gets tested)."""
    if device.type != "cuda" or INTERPRET:
        return 2
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def reduction_programs(work: int, independent: int, device: torch.device) -> int:
    """Programs to split each of ``independent`` reductions of ``work`` elements over: enough to fill
    the GPU, but at least a minimum of work each (every extra program adds a partial to finish)."""
    min_work = 64 if INTERPRET else 4096
    return max(1, min(target_programs(device) // independent, triton.cdiv(work, min_work)))


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (triton launches on the current device), a no-op for CPU tensors."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
