"""Fused layer epilogue in Triton: BatchNorm -> activation (-> + residual) -> BatchQuant (docs/epilogue.md),
no host sync.

The math and operation order are those of the CPU kernel (``csrc/cpu/epilogue_kernels_impl.h``):
``z = round_T((y - mean) * k + beta)`` with ``k = float32(gamma / sqrt(var + eps))`` (computed in
float64 from the float32 statistics), ``a = round_T(act(z))`` (``round_T``: a no-op for float32, the
16-bit rounding where the composition stores 16-bit tensors), ``s = round_T(a + r)`` with a residual
``r`` (else ``s = a``), then BatchQuant of ``s``; ``kept`` (optional) is ``s``. ``r`` has ``y``'s strides.

``y`` is viewed as ``(outer, C, inner)`` in memory (contiguous: ``inner`` = spatial size; channels_last:
``inner = 1``). Per-channel passes run on a ``(channel blocks, splits)`` grid over ``(rows, BLOCK_C)``
tiles, ``rows = outer * inner`` (row ``j`` of channel ``c`` at ``(j // inner) * C * inner + j % inner
+ c * inner``), write float32 partials ``(slot, split, C)`` and let the last program
(``last_program``) fold them in float64 in a fixed order: deterministic, no float atomics.

Forward (batch statistics): one statistics pass (shifted sums, min/max of ``y``) whose last program
writes ``stats`` (mean, biased var), the per-channel affine ``aff`` (mean, k, beta) and, for identity /
ReLU without residual, the quantizer's range from ``y``'s extremes (every step is monotone in ``y``);
h_swish or a residual (or running statistics without a stored range) reads once more for the extremes
of ``s``; then the element pass (writing ``kept`` too). Backward: one pass recomputing ``z``, the
activation, ``s`` and the quantizer mask, summing BN's per-channel terms and the quantizer's scalar
terms (last program: grad_gamma, grad_beta, BN's per-channel coefficients, grad_theta, grad_offset),
then one element pass writing grad_y and grad_residual (the gradient reaching ``s``: the quantizer's
plus the one flowing into ``kept``); it recomputes the activation's gradient instead of storing it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...qparams import NUM_QPARAMS, SCALE, ZERO, L, batchquant_grid
from .batchquant import finish_grads, finish_range, qparams_from_range, range_finish_blocks
from .launch import FINISH_BLOCK, INTERPRET, device_guard, elementwise_tuned, size_class, target_programs
from .quant_math import batchquant_elem, batchquant_elem_backward
from .reductions import fold_minmax, last_program, reduce_minmax
from .rounding import cast_rne

_QP_SCALE: tl.constexpr = tl.constexpr(SCALE)
_QP_ZERO: tl.constexpr = tl.constexpr(ZERO)
_QP_L: tl.constexpr = tl.constexpr(L)
_RELU: tl.constexpr = tl.constexpr(1)
_HSWISH: tl.constexpr = tl.constexpr(2)

# Elements per tile of the per-channel passes. Under the interpreter small, so that the tiny test
# tensors still split into two programs and exercise the partials / last-program path.
_TILE = 32 if INTERPRET else 2048
_MAX_BLOCK_C = 64  # channels per tile when channels are innermost
_FINISH_C = 256  # channels per iteration of the finishing programs


# ----------------------------------------------------------------------------- element math


@triton.jit
def _round_to(v, T: tl.constexpr):
    """float32 ``v`` rounded to ``T`` and back where ``T`` is 16-bit (the composition stores a T there)."""
    if T == tl.float32:
        return v
    else:
        return cast_rne(v, T).to(tl.float32)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """PyTorch's relu (NaN passes) and hardswish ``z * min(max(z + 3, 0), 6) / 6``, as selects (NaN passes)."""
    if ACT == _RELU:
        return tl.where(z < 0.0, 0.0, z)
    elif ACT == _HSWISH:
        t = z + 3.0
        t = tl.where(t < 0.0, 0.0, t)
        t = tl.where(t > 6.0, 6.0, t)
        return tl.math.div_rn(z * t, 6.0)
    else:
        return z


@triton.jit
def _act_backward(z, g, ACT: tl.constexpr):
    """PyTorch's threshold_backward (gradient where z > 0) and hardswish_backward."""
    if ACT == _RELU:
        return tl.where(z > 0.0, g, 0.0)
    elif ACT == _HSWISH:
        return tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, g * (tl.math.div_rn(z, 3.0) + 0.5), g))
    else:
        return g


@triton.jit
def _bn_act(v, m, k, b, ACT: tl.constexpr, T: tl.constexpr):
    """``(z, a)``: BN's output and the activation of float32 ``v``, each rounded to ``T``."""
    z = _round_to((v - m) * k + b, T)
    return z, _round_to(_act(z, ACT), T)


@triton.jit
def _plus_residual(a, r_ptr, offs, mask, RESID: tl.constexpr, T: tl.constexpr):
    """``s = a + r`` rounded to ``T`` (the composition's add in ``T``) with a residual, else ``a``."""
    if RESID:
        return _round_to(a + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32), T)
    else:
        return a


@triton.jit
def _grad_z(g, ga_ptr, r_ptr, offs, mask, v, m, k, b, l, scale, zero, offset, qmin, qmax, step, ACT: tl.constexpr,
            QUANT: tl.constexpr, RESID: tl.constexpr, GRAD_ACT: tl.constexpr, T: tl.constexpr):  # fmt: skip
    """``(gz, gs, dl_term, do_term)``: the gradients reaching BN's output and the sum ``s = a + r`` (each
    rounded to ``T`` as the composition stores it) and the quantizer's scalar-gradient terms of one
    element. ``GRAD_ACT``: the gradient flowing into the kept ``s`` adds to the quantizer's."""
    z, a = _bn_act(v, m, k, b, ACT, T)
    if QUANT:
        s = _plus_residual(a, r_ptr, offs, mask, RESID, T)
        gs, dl_term, do_term = batchquant_elem_backward(g, s, l, scale, zero, offset, qmin, qmax, step)
    else:
        gs = g
        dl_term = tl.zeros_like(g)
        do_term = tl.zeros_like(g)
    if GRAD_ACT:
        gs = _round_to(gs + tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32), T)
    return _round_to(_act_backward(z, gs, ACT), T), gs, dl_term, do_term


@triton.jit
def _channel_tile(j0, cols, rows, C, inner, BLOCK_R: tl.constexpr):
    """Offsets and mask of rows ``[j0, j0 + BLOCK_R)`` of channels ``cols``: a ``(BLOCK_R, BLOCK_C)`` tile."""
    j = j0 + tl.arange(0, BLOCK_R)
    n = j // inner
    row = n.to(tl.int64) * C * inner + (j - n * inner)
    offs = row[:, None] + (cols.to(tl.int64) * inner)[None, :]
    return offs, (j < rows)[:, None] & (cols < C)[None, :]


@triton.jit
def _affine_of(aff_ptr, c, mask, C):
    """``(mean, k, beta)`` of channels ``c`` from the (3, C) affine."""
    m = tl.load(aff_ptr + c, mask=mask, other=0.0)
    k = tl.load(aff_ptr + C + c, mask=mask, other=0.0)
    return m, k, tl.load(aff_ptr + 2 * C + c, mask=mask, other=0.0)


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    """``(cols, col_mask, split, n_splits)`` of a per-channel pass program: channel block ``program_id(0)``,
    split ``program_id(1)`` of the grid's ``num_programs(1)``."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C, tl.program_id(1), tl.num_programs(1)


@triton.jit
def _affine_row(aff_ptr, cols, col_mask, C):
    """:func:`_affine_of` channels ``cols`` as ``(1, BLOCK_C)`` rows, to broadcast over a tile."""
    m, k, b = _affine_of(aff_ptr, cols, col_mask, C)
    return m[None, :], k[None, :], b[None, :]


@triton.jit
def _element_block(aff_ptr, numel, C, inner, BLOCK: tl.constexpr):
    """``(offs, mask, c, mean, k, beta)`` of element block ``program_id(0)`` in memory order (``c``: channels)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = ((offs // inner) % C).to(tl.int32)
    m, k, b = _affine_of(aff_ptr, c, mask, C)
    return offs, mask, c, m, k, b


@triton.jit
def _store_partials(part_ptr, slot, p, mask, v0, v1, v2, v3):
    """The four per-(split, channel) partials of a pass at ``part[0..3, split, c]`` (``p = split * C + c``)."""
    tl.store(part_ptr + p, v0, mask=mask)
    tl.store(part_ptr + slot + p, v1, mask=mask)
    tl.store(part_ptr + 2 * slot + p, v2, mask=mask)
    tl.store(part_ptr + 3 * slot + p, v3, mask=mask)


@triton.jit
def _partial_sums(part_ptr, slot, c0, C, n_splits, FINISH_C: tl.constexpr):
    """``(cols, mask, sum_a, sum_b)`` of channels ``[c0, c0 + FINISH_C)``: the float64 sums, in split order,
    of two consecutive partial slots ``part[0|1, split, c]`` (``slot = n_splits * C``)."""
    cols = c0 + tl.arange(0, FINISH_C)
    cm = cols < C
    sum_a = tl.zeros([FINISH_C], dtype=tl.float64)
    sum_b = tl.zeros([FINISH_C], dtype=tl.float64)
    for split in range(0, n_splits):
        p = split * C + cols
        sum_a += tl.load(part_ptr + p, mask=cm, other=0.0, cache_modifier=".cg").to(tl.float64)
        sum_b += tl.load(part_ptr + slot + p, mask=cm, other=0.0, cache_modifier=".cg").to(tl.float64)
    return cols, cm, sum_a, sum_b


@triton.jit
def _quant_params(qp_ptr, offset_ptr, QUANT: tl.constexpr):
    """``(l, scale, zero, offset, step)`` of the quantizer from its qparams (zeros without ``QUANT``)."""
    if QUANT:
        scale = tl.load(qp_ptr + _QP_SCALE)
        l = tl.load(qp_ptr + _QP_L)
        return l, scale, tl.load(qp_ptr + _QP_ZERO), tl.load(offset_ptr).to(tl.float32), tl.math.div_rn(scale, l)
    else:
        return 0.0, 0.0, 0.0, 0.0, 0.0


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _stats_pass(
    y_ptr,
    gamma_ptr,
    beta_ptr,
    theta_ptr,
    part_ptr,
    ext_ptr,
    stats_ptr,
    aff_ptr,
    qp_ptr,
    counter_ptr,
    C,
    inner,
    rows,
    eps,
    qmin,
    qmax,
    ACT: tl.constexpr,
    RANGE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FINISH_C: tl.constexpr,
):
    """BN's batch statistics: partials part[0..3, split, c] = min, max, sum(y - shift), sum((y - shift)^2)
    (shift: the channel's first element, so that |mean| >> std loses nothing to cancellation); the
    last program finishes them (:func:`_finish_stats`)."""
    cols, col_mask, split, n_splits = _channel_block(C, BLOCK_C)
    shift = tl.load(y_ptr + cols.to(tl.int64) * inner, mask=col_mask, other=0.0).to(tl.float32)
    acc_s = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_min = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    acc_max = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    for j0 in range(split * BLOCK_R, rows, n_splits * BLOCK_R):
        offs, mask = _channel_tile(j0, cols, rows, C, inner, BLOCK_R)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - shift[None, :], 0.0)
        acc_s += d
        acc_q += d * d
        acc_min, acc_max = fold_minmax(acc_min, acc_max, v, v, mask)
    lo, hi = reduce_minmax(acc_min, acc_max, 0)
    _store_partials(part_ptr, n_splits * C, split * C + cols, col_mask, lo, hi, tl.sum(acc_s, axis=0),
                    tl.sum(acc_q, axis=0))  # fmt: skip
    if last_program(counter_ptr):
        _finish_stats(y_ptr, gamma_ptr, beta_ptr, theta_ptr, part_ptr, ext_ptr, stats_ptr, aff_ptr, qp_ptr, C, inner,
                      rows, n_splits, eps, qmin, qmax, ACT, RANGE, FINISH_C)  # fmt: skip


@triton.jit
def _finish_stats(y_ptr, gamma_ptr, beta_ptr, theta_ptr, part_ptr, ext_ptr, stats_ptr, aff_ptr, qp_ptr, C, inner,
                  rows, n_splits, eps, qmin, qmax, ACT: tl.constexpr, RANGE: tl.constexpr,
                  FINISH_C: tl.constexpr):  # fmt: skip
    """Run by one program: per channel, mean and biased var (float64 from the partials, stored as
    float32), the affine ``aff = (mean, k, beta)``; with ``RANGE`` also the activated extremes from
    ``y``'s (into ``ext``, (2, C)) and from them the quantizer's qparams (:func:`finish_range`)."""
    T: tl.constexpr = y_ptr.dtype.element_ty
    slot = n_splits * C
    count = rows.to(tl.float64)
    for c0 in range(0, C, FINISH_C):
        cols, cm, s, q = _partial_sums(part_ptr + 2 * slot, slot, c0, C, n_splits, FINISH_C)
        mn = tl.full([FINISH_C], float("inf"), tl.float32)
        mx = tl.full([FINISH_C], float("-inf"), tl.float32)
        for split in range(0, n_splits):
            p = split * C + cols
            part_min = tl.load(part_ptr + p, mask=cm, other=0.0, cache_modifier=".cg")
            part_max = tl.load(part_ptr + slot + p, mask=cm, other=0.0, cache_modifier=".cg")
            mn, mx = fold_minmax(mn, mx, part_min, part_max, cm)
        shift = tl.load(y_ptr + cols.to(tl.int64) * inner, mask=cm, other=0.0).to(tl.float32).to(tl.float64)
        ds = s / count
        var = q / count - ds * ds
        mean = (shift + ds).to(tl.float32)
        var = tl.where(var < 0.0, 0.0, var).to(tl.float32)
        tl.store(stats_ptr + cols, mean, mask=cm)
        tl.store(stats_ptr + C + cols, var, mask=cm)
        invstd = 1.0 / tl.sqrt(var.to(tl.float64) + eps)
        k = (tl.load(gamma_ptr + cols, mask=cm, other=0.0).to(tl.float64) * invstd).to(tl.float32)
        b = tl.load(beta_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(aff_ptr + cols, mean, mask=cm)
        tl.store(aff_ptr + C + cols, k, mask=cm)
        tl.store(aff_ptr + 2 * C + cols, b, mask=cm)
        if RANGE:  # monotone: the extremes of act((y - mean) * k + beta) are those at y's extremes
            mn = tl.where(cm, mn, 0.0)  # channels past C: no inf * 0
            mx = tl.where(cm, mx, 0.0)
            _, a_lo = _bn_act(mn, mean, k, b, ACT, T)
            _, a_hi = _bn_act(mx, mean, k, b, ACT, T)
            down = k < 0.0
            tl.store(ext_ptr + cols, tl.where(down, a_hi, a_lo), mask=cm)
            tl.store(ext_ptr + C + cols, tl.where(down, a_lo, a_hi), mask=cm)
    if RANGE:
        tl.debug_barrier()  # this program's ext stores, before its threads read them back
        finish_range(ext_ptr, qp_ptr, theta_ptr, 1, C, qmin, qmax, True, 2, FINISH_C)


@triton.jit
def _act_range_pass(
    y_ptr,
    r_ptr,
    aff_ptr,
    theta_ptr,
    part_ptr,
    qp_ptr,
    counter_ptr,
    C,
    inner,
    rows,
    qmin,
    qmax,
    ACT: tl.constexpr,
    RESID: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FINISH_S: tl.constexpr,
    FINISH_C: tl.constexpr,
):
    """Per-channel min/max partials of the quantizer's input ``act(bn(y)) (+ r)`` (h_swish and the
    residual's sum are not monotone in ``y``; running statistics have no statistics pass),
    part[0|1, split, c]; the last program computes the qparams."""
    T: tl.constexpr = y_ptr.dtype.element_ty
    cols, col_mask, split, n_splits = _channel_block(C, BLOCK_C)
    m, k, b = _affine_row(aff_ptr, cols, col_mask, C)
    acc_min = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    acc_max = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    for j0 in range(split * BLOCK_R, rows, n_splits * BLOCK_R):
        offs, mask = _channel_tile(j0, cols, rows, C, inner, BLOCK_R)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, a = _bn_act(v, m, k, b, ACT, T)
        a = _plus_residual(a, r_ptr, offs, mask, RESID, T)
        acc_min, acc_max = fold_minmax(acc_min, acc_max, a, a, mask)
    lo, hi = reduce_minmax(acc_min, acc_max, 0)
    p = split * C + cols
    tl.store(part_ptr + p, lo, mask=col_mask)
    tl.store(part_ptr + n_splits * C + p, hi, mask=col_mask)
    if last_program(counter_ptr):
        finish_range(part_ptr, qp_ptr, theta_ptr, n_splits, C, qmin, qmax, True, FINISH_S, FINISH_C)


@elementwise_tuned
@triton.jit
def _forward_elements(
    y_ptr,
    r_ptr,
    out_ptr,
    kept_ptr,
    aff_ptr,
    qp_ptr,
    theta_ptr,
    offset_ptr,
    lo_hi_ptr,
    numel,
    C,
    inner,
    size_class,
    qmin,
    qmax,
    ACT: tl.constexpr,
    RESID: tl.constexpr,
    KEEP: tl.constexpr,
    QUANT: tl.constexpr,
    FROM_RANGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = batchquant(s) (or s without ``QUANT``), s = act(bn(y)) (+ r with ``RESID``), in memory order;
    ``KEEP``: s into ``kept`` too. ``FROM_RANGE``: the qparams come from the stored ``lo_hi`` (every
    program computes them, program 0 stores them)."""
    T: tl.constexpr = y_ptr.dtype.element_ty
    offs, mask, _, m, k, b = _element_block(aff_ptr, numel, C, inner, BLOCK)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, a = _bn_act(v, m, k, b, ACT, T)
    a = _plus_residual(a, r_ptr, offs, mask, RESID, T)
    if KEEP:
        tl.store(kept_ptr + offs, cast_rne(a, T), mask=mask)
    if QUANT:
        if FROM_RANGE:
            first = tl.program_id(0) == 0
            scale, zero, l = qparams_from_range(lo_hi_ptr, theta_ptr, qp_ptr, qmin, qmax, first)
            offset = tl.load(offset_ptr).to(tl.float32)
            step = tl.math.div_rn(scale, l)
        else:
            l, scale, zero, offset, step = _quant_params(qp_ptr, offset_ptr, QUANT)
        by_step: tl.constexpr = T != tl.float32
        a = batchquant_elem(a, l, scale, zero, offset, qmin, qmax, step, by_step)
    tl.store(out_ptr + offs, cast_rne(a, T), mask=mask)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _backward_sums(
    g_ptr,
    ga_ptr,
    y_ptr,
    r_ptr,
    aff_ptr,
    stats_ptr,
    qp_ptr,
    offset_ptr,
    part_ptr,
    coef_ptr,
    grad_gamma_ptr,
    grad_beta_ptr,
    grad_theta_ptr,
    grad_offset_ptr,
    counter_ptr,
    C,
    inner,
    rows,
    qmin,
    qmax,
    eps,
    ACT: tl.constexpr,
    QUANT: tl.constexpr,
    RESID: tl.constexpr,
    GRAD_ACT: tl.constexpr,
    BATCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FINISH_C: tl.constexpr,
):
    """Partials part[0..3, split, c] = sum(gz), sum(gz * (y - mean)), sum(dl_term), sum(do_term) (gz: the
    gradient reaching BN's output); the last program finishes them (:func:`_finish_backward`, the only
    user of ``eps``)."""
    T: tl.constexpr = y_ptr.dtype.element_ty
    cols, col_mask, split, n_splits = _channel_block(C, BLOCK_C)
    m, k, b = _affine_row(aff_ptr, cols, col_mask, C)
    l, scale, zero, offset, step = _quant_params(qp_ptr, offset_ptr, QUANT)
    acc_1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_dl = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_do = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for j0 in range(split * BLOCK_R, rows, n_splits * BLOCK_R):
        offs, mask = _channel_tile(j0, cols, rows, C, inner, BLOCK_R)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gz, _, dl_term, do_term = _grad_z(g, ga_ptr, r_ptr, offs, mask, v, m, k, b, l, scale, zero, offset, qmin,
                                          qmax, step, ACT, QUANT, RESID, GRAD_ACT, T)  # fmt: skip
        acc_1 += tl.where(mask, gz, 0.0)
        acc_2 += tl.where(mask, gz * (v - m), 0.0)
        acc_dl += tl.where(mask, dl_term, 0.0)
        acc_do += tl.where(mask, do_term, 0.0)
    _store_partials(part_ptr, n_splits * C, split * C + cols, col_mask, tl.sum(acc_1, axis=0),
                    tl.sum(acc_2, axis=0), tl.sum(acc_dl, axis=0), tl.sum(acc_do, axis=0))  # fmt: skip
    if last_program(counter_ptr):
        _finish_backward(part_ptr, aff_ptr, stats_ptr, qp_ptr, coef_ptr, grad_gamma_ptr, grad_beta_ptr,
                         grad_theta_ptr, grad_offset_ptr, C, rows, n_splits, eps, QUANT, BATCH, FINISH_C)  # fmt: skip


@triton.jit
def _finish_backward(part_ptr, aff_ptr, stats_ptr, qp_ptr, coef_ptr, grad_gamma_ptr, grad_beta_ptr, grad_theta_ptr,
                     grad_offset_ptr, C, rows, n_splits, eps, QUANT: tl.constexpr, BATCH: tl.constexpr,
                     FINISH_C: tl.constexpr):  # fmt: skip
    """Run by one program, in float64: grad_gamma = s2 / sqrt(var + eps), grad_beta = s1, BN's coefficients
    coef = (k * s1 / count, k * invstd^2 * s2 / count) with batch statistics (zeros with running ones),
    and the quantizer's grad_theta / grad_offset (:func:`finish_grads`, partials in channel order)."""
    slot = n_splits * C
    count = rows.to(tl.float64)
    for c0 in range(0, C, FINISH_C):
        cols, cm, s1, s2 = _partial_sums(part_ptr, slot, c0, C, n_splits, FINISH_C)
        std = tl.sqrt(tl.load(stats_ptr + C + cols, mask=cm, other=1.0).to(tl.float64) + eps)
        tl.store(grad_gamma_ptr + cols, (s2 / std).to(grad_gamma_ptr.dtype.element_ty), mask=cm)
        tl.store(grad_beta_ptr + cols, s1.to(grad_beta_ptr.dtype.element_ty), mask=cm)
        c1 = tl.zeros([FINISH_C], dtype=tl.float64)
        c2 = tl.zeros([FINISH_C], dtype=tl.float64)
        if BATCH:
            invstd = 1.0 / std
            k = tl.load(aff_ptr + C + cols, mask=cm, other=0.0).to(tl.float64)
            c1 = k * s1 / count
            c2 = k * invstd * invstd * s2 / count
        tl.store(coef_ptr + cols, c1.to(tl.float32), mask=cm)
        tl.store(coef_ptr + C + cols, c2.to(tl.float32), mask=cm)
    if QUANT:  # slots 2 and 3 are (2, n_splits * C) consecutive partials, the layout finish_grads reads
        finish_grads(part_ptr + 2 * slot, qp_ptr, grad_theta_ptr, grad_offset_ptr, slot, FINISH_BLOCK)


@elementwise_tuned
@triton.jit
def _backward_elements(
    g_ptr,
    ga_ptr,
    y_ptr,
    r_ptr,
    gy_ptr,
    gr_ptr,
    aff_ptr,
    coef_ptr,
    qp_ptr,
    offset_ptr,
    qmin,
    qmax,
    numel,
    C,
    inner,
    size_class,
    ACT: tl.constexpr,
    QUANT: tl.constexpr,
    RESID: tl.constexpr,
    GRAD_ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_y = k * gz - c1 - (y - mean) * c2, with gz recomputed from y (and r) and the incoming
    gradients; ``RESID``: grad_residual = gs, the gradient reaching the sum."""
    T: tl.constexpr = y_ptr.dtype.element_ty
    offs, mask, c, m, k, b = _element_block(aff_ptr, numel, C, inner, BLOCK)
    c1 = tl.load(coef_ptr + c, mask=mask, other=0.0)
    c2 = tl.load(coef_ptr + C + c, mask=mask, other=0.0)
    l, scale, zero, offset, step = _quant_params(qp_ptr, offset_ptr, QUANT)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gz, gs, _, _ = _grad_z(g, ga_ptr, r_ptr, offs, mask, v, m, k, b, l, scale, zero, offset, qmin, qmax, step, ACT,
                           QUANT, RESID, GRAD_ACT, T)  # fmt: skip
    tl.store(gy_ptr + offs, cast_rne(k * gz - c1 - (v - m) * c2, gy_ptr.dtype.element_ty), mask=mask)
    if RESID:
        tl.store(gr_ptr + offs, cast_rne(gs, T), mask=mask)


# ----------------------------------------------------------------------------- launchers


class Plan(NamedTuple):
    """The op's configuration and what both launchers derive from it and ``y``'s ``(outer, C, inner)`` view
    (:func:`plan`)."""

    C: int
    inner: int
    eps: float
    act: int  # 0 identity, 1 relu, 2 h_swish
    quant: bool  # bits > 0
    qmin: float  # the quantizer's grid ((0, 0) without quantizer)
    qmax: float
    numel: int
    rows: int  # elements per channel
    n_blocks: int  # per-channel passes: a (n_blocks, n_splits) grid of (block_r, block_c) tiles
    n_splits: int
    block_r: int
    block_c: int
    finish_c: int  # channels per iteration of the finishing programs


def plan(y: Tensor, C: int, inner: int, eps: float, act: int, bits: int, signed: bool) -> Plan:
    """The :class:`Plan` of dense ``y`` viewed as ``(outer, C, inner)``. Channels innermost: tiles of up to
    _MAX_BLOCK_C adjacent channels; else one channel per program, rows contiguous along ``inner``."""
    numel = y.numel()
    rows = numel // C
    if rows >= 2**31:
        raise ValueError(f"y has {rows} elements per channel; the Triton kernels support fewer than 2**31")
    block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C) if inner == 1 else 1
    block_r = max(_TILE // block_c, 1)
    n_blocks = triton.cdiv(C, block_c)
    min_splits = 2 if INTERPRET else 1
    n_splits = max(1, min(max(target_programs(y.device) // n_blocks, min_splits), triton.cdiv(rows, block_r)))
    quant = bits > 0
    qmin, qmax = batchquant_grid(bits, signed) if quant else (0.0, 0.0)
    finish_c = min(triton.next_power_of_2(C), _FINISH_C)
    return Plan(C, inner, float(eps), act, quant, qmin, qmax, numel, rows, n_blocks, n_splits, block_r, block_c,
                finish_c)  # fmt: skip


def _affine(stats: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """``(3, C)`` float32 (mean, k, beta) of given statistics, as :func:`_finish_stats` computes it."""
    k = (gamma.double() * (1.0 / torch.sqrt(stats[1].double() + eps))).float()
    return torch.stack([stats[0], k, beta.float()])


def bn_act_quant_forward(
    y: Tensor,
    gamma: Tensor,
    beta: Tensor,
    residual: Tensor | None,
    theta: Tensor | None,
    offset: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    lo_hi: Tensor | None,
    eps: float,
    act: int,
    bits: int,
    signed: bool,
    keep: bool,
    C: int,
    inner: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, kept, stats, qparams, aff)`` for dense ``y`` viewed as ``(outer, C, inner)`` (``residual``:
    ``y``'s strides): ``kept`` the quantizer's input ``act(bn(y)) + residual`` when ``keep`` (else empty),
    ``stats`` (2, C) the float32 mean and biased var BN used (the running ones when given, else the
    batch's), ``qparams`` BatchQuant's (zeros when ``bits == 0``), ``aff`` (3, C) the per-channel affine
    the backward reuses."""
    p = plan(y, C, inner, eps, act, bits, signed)
    dev = y.device
    running_stats = None if running_mean is None else torch.stack([running_mean.float(), running_var.float()])
    out = torch.empty_like(y)
    kept = torch.empty_like(y) if keep else y.new_empty(0)
    qp = (torch.empty if p.quant else torch.zeros)(NUM_QPARAMS, dtype=torch.float32, device=dev)
    theta = theta if p.quant else qp
    offset = offset if p.quant else qp
    resid = residual is not None
    r = residual if resid else y  # not read without a residual
    batch = running_stats is None
    # y's extremes give the range only where s is monotone in y: no h_swish, no residual
    range_from_y = p.quant and lo_hi is None and batch and p.act != 2 and not resid
    with device_guard(y):
        if batch:
            stats = torch.empty((2, C), dtype=torch.float32, device=dev)
            aff = torch.empty((3, C), dtype=torch.float32, device=dev)
            part = torch.empty((4, p.n_splits, C), dtype=torch.float32, device=dev)
            ext = torch.empty((2, C), dtype=torch.float32, device=dev) if range_from_y else part
            counter = torch.zeros(1, dtype=torch.int32, device=dev)
            _stats_pass[(p.n_blocks, p.n_splits)](
                y, gamma, beta, theta, part, ext, stats, aff, qp, counter, C, inner, p.rows, p.eps, p.qmin,
                p.qmax, ACT=p.act, RANGE=range_from_y, BLOCK_R=p.block_r, BLOCK_C=p.block_c, FINISH_C=p.finish_c,
            )  # fmt: skip
        else:
            stats = running_stats
            aff = _affine(stats, gamma, beta, p.eps)
        if p.quant and lo_hi is None and not range_from_y:
            part = torch.empty((2, p.n_splits, C), dtype=torch.float32, device=dev)
            counter = torch.zeros(1, dtype=torch.int32, device=dev)
            _act_range_pass[(p.n_blocks, p.n_splits)](
                y, r, aff, theta, part, qp, counter, C, inner, p.rows, p.qmin, p.qmax, ACT=p.act, RESID=resid,
                BLOCK_R=p.block_r, BLOCK_C=p.block_c, **range_finish_blocks(p.n_splits, C),
            )  # fmt: skip
        lo_hi_arg = lo_hi.contiguous() if lo_hi is not None else qp
        _forward_elements[lambda meta: (triton.cdiv(p.numel, meta["BLOCK"]),)](
            y, r, out, kept if keep else out, aff, qp, theta, offset, lo_hi_arg, p.numel, C, inner,
            size_class(p.numel), p.qmin, p.qmax, ACT=p.act, RESID=resid, KEEP=keep, QUANT=p.quant,
            FROM_RANGE=p.quant and lo_hi is not None,
        )  # fmt: skip
    return out, kept, stats, qp, aff


def bn_act_quant_backward(
    grad_out: Tensor,
    grad_act: Tensor | None,
    y: Tensor,
    residual: Tensor | None,
    gamma: Tensor,
    beta: Tensor,
    stats: Tensor,
    aff: Tensor,
    offset: Tensor | None,
    qparams: Tensor,
    batch_stats: bool,
    eps: float,
    act: int,
    bits: int,
    signed: bool,
    C: int,
    inner: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_y, grad_residual, grad_gamma, grad_beta, grad_theta[1], grad_offset[1])``; ``grad_out``,
    ``grad_act`` (the gradient into ``kept``, or ``None``) and ``residual`` have ``y``'s strides.
    ``grad_residual`` is empty without residual; the scalar gradients are float32 (zero when ``bits == 0``)."""
    p = plan(y, C, inner, eps, act, bits, signed)
    dev = y.device
    resid, with_grad_act = residual is not None, grad_act is not None
    grad_y = torch.empty_like(y)
    grad_residual = torch.empty_like(y) if resid else y.new_empty(0)
    grad_gamma = torch.empty(C, dtype=gamma.dtype, device=dev)
    grad_beta = torch.empty(C, dtype=beta.dtype, device=dev)
    grad_theta = (torch.empty if p.quant else torch.zeros)(1, dtype=torch.float32, device=dev)
    grad_offset = (torch.empty if p.quant else torch.zeros)(1, dtype=torch.float32, device=dev)
    part = torch.empty((4, p.n_splits, C), dtype=torch.float32, device=dev)
    coef = torch.empty((2, C), dtype=torch.float32, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    offset = offset if p.quant else qparams
    r = residual if resid else y  # stand-ins that are not read
    ga = grad_act if with_grad_act else grad_out
    with device_guard(y):
        _backward_sums[(p.n_blocks, p.n_splits)](
            grad_out, ga, y, r, aff, stats, qparams, offset, part, coef, grad_gamma, grad_beta, grad_theta,
            grad_offset, counter, C, inner, p.rows, p.qmin, p.qmax, p.eps, ACT=p.act, QUANT=p.quant, RESID=resid,
            GRAD_ACT=with_grad_act, BATCH=batch_stats, BLOCK_R=p.block_r, BLOCK_C=p.block_c, FINISH_C=p.finish_c,
        )  # fmt: skip
        _backward_elements[lambda meta: (triton.cdiv(p.numel, meta["BLOCK"]),)](
            grad_out, ga, y, r, grad_y, grad_residual if resid else grad_y, aff, coef, qparams, offset, p.qmin,
            p.qmax, p.numel, C, inner, size_class(p.numel), ACT=p.act, QUANT=p.quant, RESID=resid,
            GRAD_ACT=with_grad_act,
        )  # fmt: skip
    return grad_y, grad_residual, grad_gamma, grad_beta, grad_theta, grad_offset
