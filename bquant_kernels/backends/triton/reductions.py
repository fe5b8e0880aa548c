"""Reductions shared by the kernels: NaN-propagating running min/max, a float64 sum of partials, and
the "last program finishes" step that lets one launch both write partials and fold them.

Min and max always travel together (one jit call each way: under the interpreter every call costs
milliseconds); both accumulators see the same elements, so they hold NaN in the same lanes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fold_minmax(acc_min, acc_max, v_min, v_max, mask):
    """Running min of ``v_min`` and max of ``v_max`` where ``mask`` (the same tensor for raw data, the
    two partials when folding partials); a NaN sticks, like torch.amin/amax and nan_min/nan_max of
    quant_math.h."""
    new_min = tl.where((v_min < acc_min) | (v_min != v_min), v_min, acc_min)
    new_max = tl.where((v_max > acc_max) | (v_max != v_max), v_max, acc_max)
    return tl.where(mask, new_min, acc_min), tl.where(mask, new_max, acc_max)


@triton.jit
def reduce_minmax(acc_min, acc_max, axis: tl.constexpr):
    """``(min, max)`` along ``axis``, NaN if any lane is NaN: tl.min/tl.max drop NaNs on the GPU."""
    has_nan = tl.max((acc_min != acc_min).to(tl.int32), axis=axis) > 0
    lo = tl.where(has_nan, float("nan"), tl.min(acc_min, axis=axis))
    hi = tl.where(has_nan, float("nan"), tl.max(acc_max, axis=axis))
    return lo, hi


@triton.jit
def sum_partials(ptr, n, BLOCK: tl.constexpr):
    """The float64 sum of ``n`` float32 per-program partials at ``ptr``, in a fixed order."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + idx, mask=idx < n, other=0.0, cache_modifier=".cg").to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def last_program(counter_ptr):
    """Whether this program is the last of its grid to get here; the last one then sees every store
    the others made before calling this. ``counter_ptr``: an int32 that is zero at launch; the last
    program sets it back to zero, so a re-launch on the same arguments (autotuning) works too.

    Each program's threads finish their stores (barrier), then one atomic increment per program with
    release semantics publishes them and with acquire semantics (for the last) makes the others'
    visible; the caller reads them past L1 (``cache_modifier=".cg"``)."""
    tl.debug_barrier()
    n_programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = arrived == n_programs - 1
    tl.store(counter_ptr, 0, mask=is_last)
    return is_last
