"""BatchQuant (spec 1) in Triton: batch range, observer, fake-quantization and its backward.

The three forward kernels are also the gated op's (``gated.py`` launches them with ``GATED=True``; its
backward is its own kernel): with ``GATED`` they read ``z = round_T(x * gate[n, c])`` in place of x, the
product taken where x is loaded (:func:`gate_product`); without it that code is pruned at compile time.

Forward with batch statistics is two launches and no host sync:
  1. per-channel min/max partials, read in place for both layouts (``_channel_minmax_planes`` for
     contiguous NCHW/NCL, ``_channel_minmax_rows`` for channels_last and 2-D), one partial per
     (split, channel); the last program to finish (``last_program``: an atomic counter) folds the
     partials per channel, averages over channels in float64 in a fixed order and computes
     ``qparams`` (lo, hi, S, z, l, dl/dtheta) on the device (``finish_range``);
  2. ``_quantize``: the element pass, reading those scalars.
With a stored range only ``_quantize`` runs; it computes the qparams itself (program 0 stores them).
The backward is one launch: an element pass writing grad_x and per-program float32 partials of the
two scalar-gradient sums, which its last program adds in float64 in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...qparams import DL_DTHETA, HI, LO, NUM_QPARAMS, SCALE, ZERO, L, batchquant_grid
from .launch import (
    ELEMENTWISE_CONFIGS,
    ELEMENTWISE_INTERPRET,
    FINISH_BLOCK,
    device_guard,
    elementwise_tuned,
    reduction_programs,
    size_class,
    tuned,
)
from .quant_math import (
    batchquant_elem,
    batchquant_elem_backward,
    observer_qparams,
    softplus_ln2,
)
from .reductions import fold_minmax, last_program, reduce_minmax, sum_partials
from .rounding import cast_rne

_QP_LO: tl.constexpr = tl.constexpr(LO)
_QP_HI: tl.constexpr = tl.constexpr(HI)
_QP_SCALE: tl.constexpr = tl.constexpr(SCALE)
_QP_ZERO: tl.constexpr = tl.constexpr(ZERO)
_QP_L: tl.constexpr = tl.constexpr(L)
_QP_DL_DTHETA: tl.constexpr = tl.constexpr(DL_DTHETA)
_TILE_CONFIGS = [
    triton.Config({"TILE": 2048}, num_warps=4),
    triton.Config({"TILE": 4096}, num_warps=4),
    triton.Config({"TILE": 4096}, num_warps=8),
    triton.Config({"TILE": 8192}, num_warps=8),
]
_ROWS_MAX_BLOCK_C = 128  # channels per program of the rows kernel (<= every TILE)
_RANGE_FINISH_TILE = 4096  # (split, channel) partials per iteration of the one-program range finish


# ----------------------------------------------------------------------------- kernels


@triton.jit
def gate_product(x, g, T: tl.constexpr):
    """``z = x * g`` of float32 ``x`` and ``g`` (values of ``T``), rounded to ``T`` like torch's mul."""
    z = x * g
    if T == tl.float32:
        return z
    else:
        return cast_rne(z, T).to(tl.float32)


# GATED in the tuning keys: gated and plain launches of one size keep separate tunings.
@tuned(_TILE_CONFIGS, key=["size_class", "BLOCK_I", "GATED"], interpret=triton.Config({"TILE": 1024}))
@triton.jit
def _channel_minmax_planes(
    x_ptr,
    part_ptr,
    out_ptr,
    theta_ptr,
    counter_ptr,
    C,
    inner,
    plane,
    n_rows,
    n_inner_blocks,
    n_splits,
    size_class,
    qmin,
    qmax,
    gate_ptr,
    BLOCK_I: tl.constexpr,
    WITH_QPARAMS: tl.constexpr,
    GATED: tl.constexpr,
    FINISH_S: tl.constexpr,
    FINISH_C: tl.constexpr,
    TILE: tl.constexpr,
):
    """Partial min/max of channel ``c`` of x viewed as ``(outer, C, inner)`` (``plane = C * inner``),
    split ``s`` of ``n_splits`` (grid ``(C, n_splits)``), into part[0|1, s, c]; the last program
    finishes the range into ``out`` (:func:`finish_range`).

    The channel is walked as ``n_rows = outer * n_inner_blocks`` rows of ``BLOCK_I`` contiguous
    elements (row q: batch index q // n_inner_blocks, inner block q % n_inner_blocks), BLOCK_Q rows
    per tile: one division per row, vector loads along the row, and no lanes lost to a short
    ``inner`` (7x7) or to a batch of one. ``GATED``: of ``z``, one gate value per row (gate ``(outer, C)``)."""
    BLOCK_Q: tl.constexpr = TILE // BLOCK_I
    c = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_I)
    channel_ptr = x_ptr + c.to(tl.int64) * inner
    acc_min = tl.full([BLOCK_Q, BLOCK_I], float("inf"), tl.float32)
    acc_max = tl.full([BLOCK_Q, BLOCK_I], float("-inf"), tl.float32)
    for start in range(split * BLOCK_Q, n_rows, n_splits * BLOCK_Q):
        q = start + tl.arange(0, BLOCK_Q)
        n = q // n_inner_blocks
        i = (q - n * n_inner_blocks) * BLOCK_I
        offs = (n.to(tl.int64) * plane + i)[:, None] + cols[None, :]
        mask = (q < n_rows)[:, None] & ((i[:, None] + cols[None, :]) < inner)
        v = tl.load(channel_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            g = tl.load(gate_ptr + n * C + c, mask=q < n_rows, other=0.0).to(tl.float32)
            v = gate_product(v, g[:, None], x_ptr.dtype.element_ty)
        acc_min, acc_max = fold_minmax(acc_min, acc_max, v, v, mask)
    lo, hi = reduce_minmax(acc_min, acc_max, None)
    tl.store(part_ptr + split * C + c, lo)
    tl.store(part_ptr + (n_splits + split) * C + c, hi)
    if last_program(counter_ptr):
        finish_range(part_ptr, out_ptr, theta_ptr, n_splits, C, qmin, qmax, WITH_QPARAMS, FINISH_S, FINISH_C)


@tuned(_TILE_CONFIGS, key=["size_class", "BLOCK_C", "GATED"], interpret=triton.Config({"TILE": 1024}))
@triton.jit
def _channel_minmax_rows(
    x_ptr,
    part_ptr,
    out_ptr,
    theta_ptr,
    counter_ptr,
    rows,
    C,
    n_splits,
    size_class,
    qmin,
    qmax,
    gate_ptr,
    S,
    BLOCK_C: tl.constexpr,
    WITH_QPARAMS: tl.constexpr,
    GATED: tl.constexpr,
    FINISH_S: tl.constexpr,
    FINISH_C: tl.constexpr,
    TILE: tl.constexpr,
):
    """Partial min/max of x viewed as ``(rows, C)`` (channels_last, 2-D): program ``(cb, s)`` folds
    channels ``[cb * BLOCK_C, ...)`` over rows of split ``s`` (grid ``(cdiv(C, BLOCK_C), n_splits)``);
    the last program finishes the range into ``out`` (:func:`finish_range`). ``GATED``: of ``z``, ``S``
    rows per sample (gate ``(rows // S, C)``)."""
    BLOCK_R: tl.constexpr = TILE // BLOCK_C
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    col_mask = cols < C
    acc_min = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    acc_max = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    for start in range(split * BLOCK_R, rows, n_splits * BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & col_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + cols[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            g = tl.load(gate_ptr + (r // S * C)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            v = gate_product(v, g, x_ptr.dtype.element_ty)
        acc_min, acc_max = fold_minmax(acc_min, acc_max, v, v, mask)
    lo, hi = reduce_minmax(acc_min, acc_max, 0)
    tl.store(part_ptr + split * C + cols, lo, mask=col_mask)
    tl.store(part_ptr + (n_splits + split) * C + cols, hi, mask=col_mask)
    if last_program(counter_ptr):
        finish_range(part_ptr, out_ptr, theta_ptr, n_splits, C, qmin, qmax, WITH_QPARAMS, FINISH_S, FINISH_C)


@triton.jit
def finish_range(
    part_ptr,
    out_ptr,
    theta_ptr,
    n_splits,
    C,
    qmin,
    qmax,
    WITH_QPARAMS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Run by one program: per-channel min/max from the ``(2, n_splits, C)`` partials, their means
    over channels in float64 (fixed order), then ``[lo, hi]`` or the full qparams into ``out``."""
    sum_min = tl.zeros([BLOCK_C], dtype=tl.float64)
    sum_max = tl.zeros([BLOCK_C], dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        ch_min = tl.full([BLOCK_S, BLOCK_C], float("inf"), tl.float32)
        ch_max = tl.full([BLOCK_S, BLOCK_C], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < n_splits)[:, None] & col_mask[None, :]
            offs = s[:, None] * C + cols[None, :]
            part_min = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            part_max = tl.load(part_ptr + n_splits * C + offs, mask=mask, other=0.0, cache_modifier=".cg")
            ch_min, ch_max = fold_minmax(ch_min, ch_max, part_min, part_max, mask)
        m, M = reduce_minmax(ch_min, ch_max, 0)
        sum_min += tl.where(col_mask, m.to(tl.float64), 0.0)
        sum_max += tl.where(col_mask, M.to(tl.float64), 0.0)
    lo = tl.sum(sum_min, axis=0) / C
    hi = tl.sum(sum_max, axis=0) / C
    tl.store(out_ptr + _QP_LO, lo.to(tl.float32))
    tl.store(out_ptr + _QP_HI, hi.to(tl.float32))
    if WITH_QPARAMS:
        scale, zero = observer_qparams(lo, hi, qmin, qmax)
        l, dl_dtheta = softplus_ln2(tl.load(theta_ptr).to(tl.float64))
        tl.store(out_ptr + _QP_SCALE, scale)
        tl.store(out_ptr + _QP_ZERO, zero)
        tl.store(out_ptr + _QP_L, l)
        tl.store(out_ptr + _QP_DL_DTHETA, dl_dtheta)


@triton.jit
def qparams_from_range(lo_hi_ptr, theta_ptr, qp_ptr, qmin, qmax, store):
    """``(scale, zero, l)`` of the stored range ``lo_hi`` and theta (a few float64 scalar ops, cheap
    enough for every program to repeat); the full qparams are written to ``qp`` where ``store``."""
    lo = tl.load(lo_hi_ptr).to(tl.float64)
    hi = tl.load(lo_hi_ptr + 1).to(tl.float64)
    scale, zero = observer_qparams(lo, hi, qmin, qmax)
    l, dl_dtheta = softplus_ln2(tl.load(theta_ptr).to(tl.float64))
    if store:
        tl.store(qp_ptr + _QP_LO, lo.to(tl.float32))
        tl.store(qp_ptr + _QP_HI, hi.to(tl.float32))
        tl.store(qp_ptr + _QP_SCALE, scale)
        tl.store(qp_ptr + _QP_ZERO, zero)
        tl.store(qp_ptr + _QP_L, l)
        tl.store(qp_ptr + _QP_DL_DTHETA, dl_dtheta)
    return scale, zero, l


@tuned(ELEMENTWISE_CONFIGS, key=["size_class", "GATED"], interpret=ELEMENTWISE_INTERPRET)
@triton.jit
def _quantize(
    x_ptr,
    y_ptr,
    qp_ptr,
    theta_ptr,
    offset_ptr,
    lo_hi_ptr,
    numel,
    size_class,
    qmin,
    qmax,
    gate_ptr,
    C,
    inner,
    sample,
    FROM_RANGE: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The element pass (spec 1.4). ``FROM_RANGE``: the qparams come from ``lo_hi`` and theta,
    computed by every program (a few float64 scalar ops) and stored by program 0; else they are read.
    ``GATED``: of ``z``, x viewed as ``(outer, C, inner)``: element ``i`` has sample ``i // sample``
    (``sample = numel // N``) and channel ``(i % sample // inner) % C``."""
    pid = tl.program_id(0)
    if FROM_RANGE:
        scale, zero, l = qparams_from_range(lo_hi_ptr, theta_ptr, qp_ptr, qmin, qmax, pid == 0)
    else:
        scale = tl.load(qp_ptr + _QP_SCALE)
        zero = tl.load(qp_ptr + _QP_ZERO)
        l = tl.load(qp_ptr + _QP_L)
    offset = tl.load(offset_ptr).to(tl.float32)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        n = offs // sample
        c = ((offs - n * sample).to(tl.int32) // inner) % C
        g = tl.load(gate_ptr + n * C + c, mask=mask, other=0.0).to(tl.float32)
        x = gate_product(x, g, x_ptr.dtype.element_ty)
    y_dtype = y_ptr.dtype.element_ty
    by_step = (y_dtype == tl.float16) or (y_dtype == tl.bfloat16)
    y = batchquant_elem(x, l, scale, zero, offset, qmin, qmax, tl.math.div_rn(scale, l), by_step)
    tl.store(y_ptr + offs, cast_rne(y, y_dtype), mask=mask)


@elementwise_tuned
@triton.jit
def _quantize_backward(
    g_ptr,
    x_ptr,
    gx_ptr,
    qp_ptr,
    offset_ptr,
    part_ptr,
    grad_theta_ptr,
    grad_offset_ptr,
    counter_ptr,
    numel,
    n_programs,
    size_class,
    qmin,
    qmax,
    BLOCK: tl.constexpr,
):
    """grad_x, and per-program float32 partials part[0, pid] = sum(dl_term), part[1, pid] = sum(do_term)
    (grid-stride loop over ``n_programs`` programs, so the partial count does not depend on BLOCK),
    which the last program adds into grad_theta and grad_offset (:func:`finish_grads`)."""
    pid = tl.program_id(0)
    scale = tl.load(qp_ptr + _QP_SCALE)
    zero = tl.load(qp_ptr + _QP_ZERO)
    l = tl.load(qp_ptr + _QP_L)
    offset = tl.load(offset_ptr).to(tl.float32)
    step = tl.math.div_rn(scale, l)
    acc_dl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_do = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid.to(tl.int64) * BLOCK, numel, n_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_x, dl_term, do_term = batchquant_elem_backward(g, x, l, scale, zero, offset, qmin, qmax, step)
        tl.store(gx_ptr + offs, cast_rne(grad_x, gx_ptr.dtype.element_ty), mask=mask)
        acc_dl += dl_term  # masked lanes have g = 0, so their terms are 0
        acc_do += do_term
    tl.store(part_ptr + pid, tl.sum(acc_dl, axis=0))
    tl.store(part_ptr + n_programs + pid, tl.sum(acc_do, axis=0))
    if last_program(counter_ptr):
        finish_grads(part_ptr, qp_ptr, grad_theta_ptr, grad_offset_ptr, n_programs, FINISH_BLOCK)


@triton.jit
def finish_grads(part_ptr, qp_ptr, grad_theta_ptr, grad_offset_ptr, n_programs, BLOCK: tl.constexpr):
    """Run by one program: grad_theta = sum_dl / l * dl/dtheta, grad_offset = -sum_do * S / l, in float64;
    grad_offset is NaN when S is not finite (csrc/common/quant_math.h, batchquant_scalar_grads)."""
    sum_dl = sum_partials(part_ptr, n_programs, BLOCK)
    sum_do = sum_partials(part_ptr + n_programs, n_programs, BLOCK)
    scale = tl.load(qp_ptr + _QP_SCALE).to(tl.float64)
    l = tl.load(qp_ptr + _QP_L).to(tl.float64)
    dl_dtheta = tl.load(qp_ptr + _QP_DL_DTHETA).to(tl.float64)
    tl.store(grad_theta_ptr, (sum_dl / l * dl_dtheta).to(tl.float32))
    finite_scale = scale - scale == 0.0  # false for +-inf and NaN
    tl.store(grad_offset_ptr, tl.where(finite_scale, -sum_do * scale / l, scale - scale).to(tl.float32))


# ----------------------------------------------------------------------------- launchers


def _inner_block(inner: int) -> int:
    """Row length for the planes kernel: the power of two in [min(32, next_pow2(inner)), 1024] that
    wastes the fewest lanes on ``inner`` (the larger on a tie: longer contiguous runs)."""
    smallest = min(32, triton.next_power_of_2(inner))
    candidates = [1 << k for k in range(smallest.bit_length() - 1, 11)]
    return max(candidates, key=lambda b: (inner / (triton.cdiv(inner, b) * b), b))


def range_finish_blocks(n_splits: int, C: int) -> dict[str, int]:
    """Tile of the range finish: (split, channel) partials per iteration, about _RANGE_FINISH_TILE."""
    block_s = min(triton.next_power_of_2(n_splits), 64)
    return {"FINISH_S": block_s, "FINISH_C": min(triton.next_power_of_2(C), max(16, _RANGE_FINISH_TILE // block_s))}


def _range(
    x: Tensor,
    C: int,
    inner: int,
    out: Tensor,
    theta: Tensor,
    grid: tuple[float, float],
    gate: Tensor | None = None,
    S: int = 1,
) -> None:
    """One launch: per-channel min/max partials of ``x`` (of ``z = round_T(x * gate)`` where a gate,
    ``(N, C)`` contiguous with ``S`` spatial elements per (sample, channel), is given), folded by the last
    program into ``out`` (``[lo, hi]``, or the full qparams when ``out`` has NUM_QPARAMS elements)."""
    numel = x.numel()
    counter = torch.zeros(1, dtype=torch.int32, device=x.device)
    with_qparams = out.numel() == NUM_QPARAMS
    gated = gate is not None
    gate_arg = gate if gated else x  # not read without GATED
    if inner == 1:
        rows = numel // C
        block_c = min(triton.next_power_of_2(C), _ROWS_MAX_BLOCK_C)
        n_splits = reduction_programs(rows * min(C, block_c), triton.cdiv(C, block_c), x.device)
        part = torch.empty((2, n_splits, C), dtype=torch.float32, device=x.device)
        _channel_minmax_rows[lambda meta: (triton.cdiv(C, block_c), n_splits)](
            x, part, out, theta, counter, rows, C, n_splits, size_class(numel), grid[0], grid[1], gate_arg, S,
            BLOCK_C=block_c, WITH_QPARAMS=with_qparams, GATED=gated, **range_finish_blocks(n_splits, C),
        )  # fmt: skip
        return
    outer = numel // (C * inner)
    block_i = _inner_block(inner)
    n_inner_blocks = triton.cdiv(inner, block_i)
    n_rows = outer * n_inner_blocks
    if n_rows >= 2**31:
        raise ValueError(f"x has {outer * inner} elements per channel; the Triton kernels support fewer")
    n_splits = reduction_programs(outer * inner, C, x.device)
    part = torch.empty((2, n_splits, C), dtype=torch.float32, device=x.device)
    _channel_minmax_planes[(C, n_splits)](
        x, part, out, theta, counter, C, inner, C * inner, n_rows, n_inner_blocks, n_splits, size_class(numel),
        grid[0], grid[1], gate_arg, BLOCK_I=block_i, WITH_QPARAMS=with_qparams, GATED=gated,
        **range_finish_blocks(n_splits, C),
    )  # fmt: skip


def batch_range(x: Tensor, C: int, inner: int) -> Tensor:
    """float32 ``[lo, hi]``: channel means of the per-channel min and max (spec 1.1)."""
    out = torch.empty(2, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _range(x, C, inner, out, out, (0.0, 0.0))  # theta unused without qparams
    return out


def batchquant_forward(
    x: Tensor,
    theta: Tensor,
    offset: Tensor,
    lo_hi: Tensor | None,
    bits: int,
    signed: bool,
    C: int,
    inner: int,
    gate: Tensor | None = None,
    S: int = 1,
) -> tuple[Tensor, Tensor]:
    """``(y, qparams)``: spec 1.4 with the batch range (``lo_hi=None``) or the given one; of ``z =
    round_T(x * gate)`` where a gate (``(N, C)`` contiguous, ``S`` spatial elements per (sample, channel))
    is given (gated.py)."""
    grid = batchquant_grid(bits, signed)
    numel = x.numel()
    y = torch.empty_like(x)  # same strides as x: the element pass runs in memory order
    qp = torch.empty(NUM_QPARAMS, dtype=torch.float32, device=x.device)
    from_range = lo_hi is not None
    with device_guard(x):
        if from_range:
            lo_hi = lo_hi.contiguous()
        else:
            _range(x, C, inner, qp, theta, grid, gate=gate, S=S)
            lo_hi = qp  # not read
        # Ungated: x stands in for the gate and 1 for its index arguments (not read).
        gate_args = (x, 1, 1, 1) if gate is None else (gate, C, inner, C * S)
        _quantize[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
            x, y, qp, theta, offset, lo_hi, numel, size_class(numel), grid[0], grid[1], *gate_args,
            FROM_RANGE=from_range, GATED=gate is not None,
        )  # fmt: skip
    return y, qp


def batchquant_backward(
    grad_y: Tensor, x: Tensor, offset: Tensor, qparams: Tensor, bits: int, signed: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_theta[1], grad_offset[1])`` (spec 1.5), scalar gradients in float32."""
    if qparams.dtype != torch.float32:
        raise TypeError(f"qparams must be float32 for the triton backend, got {qparams.dtype}")
    grid = batchquant_grid(bits, signed)
    numel = x.numel()
    n_programs = reduction_programs(numel, 1, x.device)
    grad_x = torch.empty_like(x)
    part = torch.empty(2 * n_programs, dtype=torch.float32, device=x.device)
    grad_theta = torch.empty(1, dtype=torch.float32, device=x.device)
    grad_offset = torch.empty(1, dtype=torch.float32, device=x.device)
    counter = torch.zeros(1, dtype=torch.int32, device=x.device)
    with device_guard(x):
        _quantize_backward[(n_programs,)](
            grad_y, x, grad_x, qparams, offset, part, grad_theta, grad_offset, counter, numel, n_programs,
            size_class(numel), grid[0], grid[1],
        )  # fmt: skip
    return grad_x, grad_theta, grad_offset
