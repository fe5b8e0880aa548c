"""Gated BatchQuant in Triton: BatchQuant(x * gate) in one op, ``gate`` one value per (sample, channel)
(the squeeze-excitation output), with the numbers of the composition ``batchquant(round_T(x * gate))``.

``z = round_T(x * gate[n, c])`` (torch's mul in ``T``: the float32 product, exact for 16-bit operands,
rounded to ``T`` once) is computed where ``x`` is loaded and never stored. ``x`` is viewed as
``(outer, C, inner)`` in memory (backend contract): contiguous ``(N, C, S)`` or channels-innermost
``(N, S, C)`` (``inner == 1``), ``S`` the spatial size; ``gate`` is ``(N, C)`` contiguous.

Forward: no kernel or launcher of its own: ``batchquant_forward`` with the gate runs ``batchquant.py``'s
kernels with ``GATED=True``: per-channel min/max partials of ``z`` (``_channel_minmax_planes`` or
``_channel_minmax_rows``, the same layouts and splits) whose last program computes the qparams with
``finish_range``, then the element pass ``_quantize`` (alone with a stored range). The same element math
on the same ``z`` values: ``y`` and the qparams are those of the composition bit for bit.

Backward: ``_gated_backward`` (here), one launch over work units of ``(BLOCK_N samples, BLOCK_C
channels)``, each walking the units' whole spatial extent in ``(BLOCK_N, BLOCK_C, BLOCK_S)`` tiles: it
recomputes ``z``, takes BatchQuant's element gradient ``gz`` (``batchquant_elem_backward``), writes
``grad_x = round_T(gz * g)`` and ``grad_gate[n, c] = round_T(sum_s round_T(gz * x))`` (float32 sum in a
fixed order, stored by the unit's program: no partials, no atomics), and keeps per-program float32
partials of the two scalar sums, which the last program adds in float64 (``finish_grads``, as
``batchquant_backward``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...qparams import SCALE, ZERO, L, batchquant_grid
from .batchquant import (
    _ROWS_MAX_BLOCK_C,
    _inner_block,
    batchquant_forward,
    finish_grads,
    gate_product,
)
from .launch import (
    FINISH_BLOCK,
    INTERPRET,
    device_guard,
    target_programs,
)
from .quant_math import batchquant_elem_backward
from .reductions import last_program
from .rounding import cast_rne

_QP_SCALE: tl.constexpr = tl.constexpr(SCALE)
_QP_ZERO: tl.constexpr = tl.constexpr(ZERO)
_QP_L: tl.constexpr = tl.constexpr(L)

# Elements per tile of the backward. Under the interpreter small, so that the tiny test tensors still
# split into several work units, programs and spatial steps.
_TILE = 64 if INTERPRET else 2048
_BACKWARD_WARPS = 4
_MIN_BLOCK_C_ROWS = 16  # channels-innermost: the narrowest channel block the backward shrinks to


# ----------------------------------------------------------------------------- backward kernel


@triton.jit
def _gated_backward(
    g_ptr,
    x_ptr,
    gate_ptr,
    gx_ptr,
    gg_ptr,
    qp_ptr,
    offset_ptr,
    part_ptr,
    grad_theta_ptr,
    grad_offset_ptr,
    counter_ptr,
    N,
    C,
    S,
    n_cblocks,
    n_units,
    qmin,
    qmax,
    CL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """grad_x and grad_gate of work units ``(n block, c block)`` (unit ``u``: ``u // n_cblocks``,
    ``u % n_cblocks``), grid-stride over the units; x is ``(N, C, S)`` or with ``CL`` ``(N, S, C)`` in
    memory. Per-program partials part[0, pid] = sum(dl_term), part[1, pid] = sum(do_term), finished by
    the last program (:func:`finish_grads`)."""
    T: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    scale = tl.load(qp_ptr + _QP_SCALE)
    zero = tl.load(qp_ptr + _QP_ZERO)
    l = tl.load(qp_ptr + _QP_L)
    offset = tl.load(offset_ptr).to(tl.float32)
    step = tl.math.div_rn(scale, l)
    acc_dl = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_do = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
    ns = tl.arange(0, BLOCK_N)
    cs = tl.arange(0, BLOCK_C)
    ss = tl.arange(0, BLOCK_S)[None, None, :]
    for unit in range(pid, n_units, n_programs):
        nb = unit // n_cblocks
        n = nb * BLOCK_N + ns
        c = (unit - nb * n_cblocks) * BLOCK_C + cs
        nc_mask = (n < N)[:, None] & (c < C)[None, :]  # (BLOCK_N, BLOCK_C)
        gate_offs = n[:, None] * C + c[None, :]
        gate = tl.load(gate_ptr + gate_offs, mask=nc_mask, other=0.0).to(tl.float32)[:, :, None]
        if CL:
            base = (n.to(tl.int64) * S * C)[:, None, None] + c[None, :, None]
        else:
            base = (n.to(tl.int64) * C * S)[:, None, None] + (c * S)[None, :, None]
        acc_gg = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + ss
            mask = nc_mask[:, :, None] & (s < S)
            if CL:
                offs = base + s * C
            else:
                offs = base + s
            gy = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = gate_product(x, gate, T)
            gz, dl_term, do_term = batchquant_elem_backward(gy, z, l, scale, zero, offset, qmin, qmax, step)
            tl.store(gx_ptr + offs, cast_rne(gz * gate, T), mask=mask)
            acc_gg += tl.where(mask, gate_product(gz, x, T), 0.0)  # each product rounded to T, summed in float32
            acc_dl += tl.where(mask, dl_term, 0.0)
            acc_do += tl.where(mask, do_term, 0.0)
        tl.store(gg_ptr + gate_offs, cast_rne(tl.sum(acc_gg, axis=2), T), mask=nc_mask)
    tl.store(part_ptr + pid, tl.sum(tl.sum(tl.sum(acc_dl, axis=2), axis=1), axis=0))
    tl.store(part_ptr + n_programs + pid, tl.sum(tl.sum(tl.sum(acc_do, axis=2), axis=1), axis=0))
    if last_program(counter_ptr):
        finish_grads(part_ptr, qp_ptr, grad_theta_ptr, grad_offset_ptr, n_programs, FINISH_BLOCK)


# ----------------------------------------------------------------------------- launchers


def _shape(x: Tensor, gate: Tensor, C: int, inner: int) -> tuple[int, int]:
    """``(N, S)``: samples and spatial size of ``x`` viewed as ``(outer, C, inner)``, with the checks the
    kernels' int32 index math needs."""
    N = gate.shape[0]
    if gate.shape != (N, C) or N * C == 0 or x.numel() % (N * C) != 0:
        raise ValueError(f"gate must be (N, C) with x of N * C * S elements, got {tuple(gate.shape)}, C={C}")
    S = x.numel() // (N * C)
    if inner != 1 and inner != S:
        raise ValueError(f"x viewed as (outer, C, inner) must have inner = 1 or the spatial size {S}, got {inner}")
    if S * C >= 2**31 or N * C >= 2**31:
        raise ValueError(f"x has {S * C} elements per sample; the Triton kernels support fewer than 2**31")
    return N, S


def gated_batchquant_forward(
    x: Tensor,
    gate: Tensor,
    theta: Tensor,
    offset: Tensor,
    lo_hi: Tensor | None,
    bits: int,
    signed: bool,
    C: int,
    inner: int,
) -> tuple[Tensor, Tensor]:
    """``(y, qparams)`` of ``batchquant(x * gate)`` (``gate`` (N, C) contiguous, x's dtype), bit-identical
    to :func:`batchquant.batchquant_forward` of the materialized product; ``y`` with x's strides."""
    _, S = _shape(x, gate, C, inner)
    return batchquant_forward(x, theta, offset, lo_hi, bits, signed, C, inner, gate=gate.contiguous(), S=S)


def _backward_blocks(N: int, C: int, S: int, cl: bool, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_C, BLOCK_S)`` of the backward's tiles (about _TILE elements): the spatial block
    along the contiguous rows (contiguous x) or the channel block along them (channels innermost), then
    as many samples as fit; units are halved (samples first) while there are fewer than the programs
    the device wants."""
    p2 = triton.next_power_of_2
    if cl:
        block_c = min(p2(C), _ROWS_MAX_BLOCK_C)
    else:
        block_s = min(_inner_block(S), _TILE)
        block_c = min(p2(C), max(1, _TILE // block_s))
    min_block_c = min(block_c, _MIN_BLOCK_C_ROWS) if cl else 1

    def fit(block_c: int) -> tuple[int, int]:
        bs = min(p2(S), max(1, _TILE // block_c)) if cl else block_s
        return bs, min(p2(N), max(1, _TILE // (block_c * bs)))

    block_s, block_n = fit(block_c)
    target = target_programs(device)
    while triton.cdiv(N, block_n) * triton.cdiv(C, block_c) < target:
        if block_n > 1:
            block_n //= 2
        elif block_c > min_block_c:
            block_c //= 2
            block_s, _ = fit(block_c)
        else:
            break
    return block_n, block_c, block_s


def gated_batchquant_backward(
    grad_y: Tensor,
    x: Tensor,
    gate: Tensor,
    offset: Tensor,
    qparams: Tensor,
    bits: int,
    signed: bool,
    C: int,
    inner: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_gate, grad_theta[1], grad_offset[1])`` of ``batchquant(x * gate)``: ``grad_y`` and
    ``grad_x`` with x's strides, ``grad_gate`` (N, C) in x's dtype, scalar gradients in float32."""
    if qparams.dtype != torch.float32:
        raise TypeError(f"qparams must be float32 for the triton backend, got {qparams.dtype}")
    N, S = _shape(x, gate, C, inner)
    if grad_y.shape != x.shape or any(
        a != b for a, b, n in zip(grad_y.stride(), x.stride(), x.shape, strict=True) if n > 1
    ):
        raise ValueError("grad_y must have the shape and strides of x")
    gate = gate.contiguous()
    grid = batchquant_grid(bits, signed)
    cl = inner == 1
    block_n, block_c, block_s = _backward_blocks(N, C, S, cl, x.device)
    n_cblocks = triton.cdiv(C, block_c)
    n_units = triton.cdiv(N, block_n) * n_cblocks
    n_programs = min(target_programs(x.device), n_units)
    grad_x = torch.empty_like(x)
    grad_gate = torch.empty((N, C), dtype=x.dtype, device=x.device)
    part = torch.empty(2 * n_programs, dtype=torch.float32, device=x.device)
    grad_theta = torch.empty(1, dtype=torch.float32, device=x.device)
    grad_offset = torch.empty(1, dtype=torch.float32, device=x.device)
    counter = torch.zeros(1, dtype=torch.int32, device=x.device)
    with device_guard(x):
        _gated_backward[(n_programs,)](
            grad_y, x, gate, grad_x, grad_gate, qparams, offset, part, grad_theta, grad_offset, counter, N, C, S,
            n_cblocks, n_units, grid[0], grid[1], CL=cl, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_S=block_s,
            num_warps=_BACKWARD_WARPS,
        )  # fmt: skip
    return grad_x, grad_gate, grad_theta, grad_offset
