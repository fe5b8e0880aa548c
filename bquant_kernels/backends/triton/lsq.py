"""LSQ (spec 2) in Triton: one element pass forward; backward is one element pass writing grad_w
and per-program float32 partials, which its last program adds in float64 for grad_step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...qparams import lsq_grid
from .launch import (
    FINISH_BLOCK,
    device_guard,
    elementwise_tuned,
    reduction_programs,
    size_class,
)
from .quant_math import lsq_elem, lsq_elem_backward
from .reductions import last_program, sum_partials
from .rounding import cast_rne


@elementwise_tuned
@triton.jit
def _lsq_quantize(w_ptr, step_ptr, out_ptr, numel, size_class, qn, qp, BLOCK: tl.constexpr):
    abs_step = tl.abs(tl.load(step_ptr).to(tl.float32))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rne(lsq_elem(w, abs_step, qn, qp), out_ptr.dtype.element_ty), mask=mask)


@elementwise_tuned
@triton.jit(do_not_specialize=["numel_full"])  # a value of 1 would otherwise become a constexpr
def _lsq_quantize_backward(
    g_ptr,
    w_ptr,
    step_ptr,
    gw_ptr,
    part_ptr,
    grad_step_ptr,
    counter_ptr,
    numel,
    n_programs,
    numel_full,
    size_class,
    qn,
    qp,
    BLOCK: tl.constexpr,
):
    """grad_w and part[pid] = sum(ds_term) over a grid-stride loop of ``n_programs`` programs; the last
    program adds the partials into grad_step (:func:`finish_grad_step`)."""
    pid = tl.program_id(0)
    abs_step = tl.abs(tl.load(step_ptr).to(tl.float32))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid.to(tl.int64) * BLOCK, numel, n_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_w, ds_term = lsq_elem_backward(g, w, abs_step, qn, qp)
        tl.store(gw_ptr + offs, cast_rne(grad_w, gw_ptr.dtype.element_ty), mask=mask)
        acc += ds_term  # masked lanes have g = 0
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))
    if last_program(counter_ptr):
        finish_grad_step(part_ptr, step_ptr, grad_step_ptr, n_programs, numel_full, qp, FINISH_BLOCK)


@triton.jit
def finish_grad_step(part_ptr, step_ptr, grad_step_ptr, n_programs, numel_full, qp, BLOCK: tl.constexpr):
    """Run by one program: grad_step = sum(ds_term) * k * sign(s), k = 1 / sqrt(numel_full * Qp), in float64."""
    total = sum_partials(part_ptr, n_programs, BLOCK)
    k = 1.0 / tl.sqrt(tl.cast(numel_full, tl.float64) * tl.cast(qp, tl.float64))
    step = tl.load(step_ptr).to(tl.float32).to(tl.float64)
    sign = tl.where(step > 0.0, 1.0, tl.where(step < 0.0, -1.0, 0.0))  # torch.sign: 0 for 0 and NaN
    tl.store(grad_step_ptr, (total * k * sign).to(tl.float32))


def lsq_forward(w: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    """``|s| * round(clamp(w / |s|, Qn, Qp))`` in w's dtype (``w`` contiguous)."""
    qn, qp = lsq_grid(bits, signed)
    numel = w.numel()
    out = torch.empty_like(w)
    with device_guard(w):
        _lsq_quantize[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](w, step, out, numel, size_class(numel), qn, qp)
    return out


def lsq_backward(
    grad: Tensor, w: Tensor, step: Tensor, bits: int, signed: bool, numel_full: int
) -> tuple[Tensor, Tensor]:
    """``(grad_w, grad_step[1])``, grad_step in float32 (``grad`` and ``w`` contiguous)."""
    qn, qp = lsq_grid(bits, signed)
    numel = w.numel()
    n_programs = reduction_programs(numel, 1, w.device)
    grad_w = torch.empty_like(w)
    part = torch.empty(n_programs, dtype=torch.float32, device=w.device)
    grad_step = torch.empty(1, dtype=torch.float32, device=w.device)
    counter = torch.zeros(1, dtype=torch.int32, device=w.device)
    with device_guard(w):
        _lsq_quantize_backward[(n_programs,)](
            grad, w, step, grad_w, part, grad_step, counter, numel, n_programs, numel_full, size_class(numel), qn, qp
        )
    return grad_w, grad_step
