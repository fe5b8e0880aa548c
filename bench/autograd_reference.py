"""docs/spec-batchquant.md written as differentiable PyTorch with no host sync: the ``torch.compile`` baseline.

This is what a user would write to get the spec from ``torch.compile`` instead of custom kernels:
forward only, with autograd deriving the backward (straight-through round, inclusive clamp mask for
BatchQuant, exclusive for LSQ) and Inductor fusing both. Observer and softplus run on the device in
float32 (spec 1.2 allows it); half-precision inputs compute in float32 (spec 1.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bquant_kernels.qparams import LN2, MIN_SCALE, SOFTPLUS_THRESHOLD, batchquant_grid, lsq_grid


def _straight_through_clamp_round(u: Tensor, lo: float, hi: float, *, inclusive: bool) -> Tensor:
    """``round(clamp(u, lo, hi))`` whose gradient is 1 inside ``[lo, hi]`` (or ``(lo, hi)``) and 0 outside."""
    inside = (u >= lo) & (u <= hi) if inclusive else (u > lo) & (u < hi)
    clamped = torch.where(inside, u, u.detach().clamp(lo, hi))
    return clamped + (clamped.round() - clamped).detach()


def batchquant_autograd(x: Tensor, theta: Tensor, offset: Tensor, bits: int, signed: bool = False) -> Tensor:
    """BatchQuant with batch statistics (spec 1), differentiable in ``x``, ``theta`` and ``offset``."""
    qmin, qmax = batchquant_grid(bits, signed)
    dims = [d for d in range(x.dim()) if d != 1]
    with torch.no_grad():  # the statistics are constants for autograd (spec 1.1)
        lo = torch.amin(x, dim=dims).float().mean().clamp(max=0.0)
        hi = torch.amax(x, dim=dims).float().mean().clamp(min=0.0)
        degenerate = hi == lo
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        scale = torch.where(degenerate, torch.ones_like(scale), scale)
        zero = torch.where(degenerate, torch.zeros_like(zero), zero)
    l = F.softplus(theta.float(), beta=LN2, threshold=SOFTPLUS_THRESHOLD)
    o = offset.float()
    u = x.float() * l / scale + zero + o
    q = _straight_through_clamp_round(u, qmin, qmax, inclusive=True)
    return ((q - zero - o) * scale / l).to(x.dtype)


def lsq_autograd(w: Tensor, step: Tensor, bits: int, signed: bool = True, numel_full: int | None = None) -> Tensor:
    """LSQ (spec 2), differentiable in ``w`` and ``step`` with the gradient scale ``1/sqrt(numel_full * Qp)``."""
    qn, qp = lsq_grid(bits, signed)
    k = 1.0 / math.sqrt((w.numel() if numel_full is None else numel_full) * qp)
    s = step.float()
    s = (s - s * k).detach() + s * k  # value s, gradient k * grad
    v = w.float() / s.abs()
    return (_straight_through_clamp_round(v, qn, qp, inclusive=False) * s.abs()).to(w.dtype)
