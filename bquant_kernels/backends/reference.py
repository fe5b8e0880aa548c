"""Reference backend: eager PyTorch written straight from docs/spec-batchquant.md.

It is the oracle every other backend is tested against (run on float64 inputs it is the float64
reference of the spec). It takes any floating dtype and memory format and makes no host sync.
Every function follows the backend contract documented in ``bquant_kernels/backends/__init__.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..qparams import (
    DL_DTHETA,
    LN2,
    MIN_SCALE,
    NUM_QPARAMS,
    SCALE,
    SOFTPLUS_THRESHOLD,
    ZERO,
    L,
    batchquant_grid,
    lsq_grid,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cpu", "cuda")


def available() -> tuple[bool, str]:
    return True, "eager PyTorch, any device"


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision inputs are computed in float32 (spec 1.4); float64 stays float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_minmax(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    return torch.amin(x, dim=dims), torch.amax(x, dim=dims)


def batch_range(x: Tensor, C: int, inner: int) -> Tensor:
    """float32 ``[lo, hi]``: means over channels of the per-channel min and max (spec 1.1)."""
    m, M = _channel_minmax(x)
    return torch.stack([m.double().mean(), M.double().mean()]).float()


def make_qparams(lo: Tensor, hi: Tensor, theta: Tensor, bits: int, signed: bool, dtype: torch.dtype) -> Tensor:
    """Observer (spec 1.2) and softplus (spec 1.3), in float64, stored in ``dtype``."""
    qmin, qmax = batchquant_grid(bits, signed)
    lo, hi = lo.double(), hi.double()
    lo0 = torch.clamp(lo, max=0.0)
    hi0 = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi0 - lo0) / (qmax - qmin), min=MIN_SCALE).to(dtype)
    # z is derived from the scale the element pass will use.
    zero = torch.clamp(qmin - torch.round(lo0 / scale.double()), qmin, qmax)
    degenerate = hi0 == lo0
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    zero = torch.where(degenerate, torch.zeros_like(zero), zero)
    t = theta.double().reshape(())
    above = t * LN2 > SOFTPLUS_THRESHOLD
    l = torch.where(above, t, torch.log1p(torch.exp(t * LN2)) / LN2)
    dl = torch.where(above, torch.ones_like(t), torch.sigmoid(t * LN2))
    parts = [lo, hi, scale.double(), zero, l.to(dtype).double(), dl.to(dtype).double()]
    return torch.stack(parts).to(dtype)


def element_pass(x: Tensor, offset: Tensor, qp: Tensor, bits: int, signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """u and the spec 1.4 forward in the compute dtype: returns (xf, y, inside).

    For 16-bit ``x``, y = (q - z - o) * (S / l), as every backend computes it (a multiply where the
    spec divides: the same 16-bit values but where the two float32 results straddle a rounding
    midpoint; csrc/common/quant_math.h, batchquant_elem)."""
    qmin, qmax = batchquant_grid(bits, signed)
    dt = qp.dtype
    l, scale, zero = qp[L], qp[SCALE], qp[ZERO]
    o = offset.to(dt).reshape(())
    xf = x.to(dt)
    u = xf * l / scale + zero + o
    q = torch.round(torch.clamp(u, qmin, qmax))
    y = (q - zero - o) * (scale / l) if x.element_size() == 2 else (q - zero - o) * scale / l
    inside = (u >= qmin) & (u <= qmax)  # inclusive at both ends (spec 1.5)
    return xf, y, inside


def batchquant_forward(
    x: Tensor, theta: Tensor, offset: Tensor, lo_hi: Tensor | None, bits: int, signed: bool, C: int, inner: int
) -> tuple[Tensor, Tensor]:
    dt = _compute_dtype(x)
    if lo_hi is None:
        m, M = _channel_minmax(x)
        lo, hi = m.double().mean(), M.double().mean()
    else:
        lo, hi = lo_hi[0], lo_hi[1]
    qp = make_qparams(lo, hi, theta, bits, signed, dt)
    _, y, _ = element_pass(x, offset, qp, bits, signed)
    return y.to(x.dtype), qp


def batchquant_backward(
    grad_y: Tensor, x: Tensor, offset: Tensor, qp: Tensor, bits: int, signed: bool
) -> tuple[Tensor, Tensor, Tensor]:
    xf, y, inside = element_pass(x, offset, qp, bits, signed)
    g = grad_y.to(qp.dtype)
    l, scale, dl_dtheta = qp[L], qp[SCALE], qp[DL_DTHETA]
    grad_x = torch.where(inside, g, torch.zeros_like(g)).to(x.dtype)
    dy_dl = torch.where(inside, (xf - y) / l, -(y / l))
    dy_do = torch.where(inside, torch.zeros_like(y), (-scale / l).expand_as(y))
    grad_l = (g * dy_dl).sum(dtype=torch.float64)
    grad_theta = (grad_l * dl_dtheta.double()).to(qp.dtype).reshape(1)
    grad_offset = (g * dy_do).sum(dtype=torch.float64)
    # An infinite S (a +-inf in the batch range) makes grad_offset NaN whatever the signs of g (spec 1.7).
    grad_offset = torch.where(torch.isfinite(scale), grad_offset, torch.nan).to(qp.dtype).reshape(1)
    return grad_x, grad_theta, grad_offset


def lsq_forward(w: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    qn, qp = lsq_grid(bits, signed)
    dt = _compute_dtype(w)
    s = step.to(dt).reshape(()).abs()
    v = w.to(dt) / s
    return (torch.round(torch.clamp(v, qn, qp)) * s).to(w.dtype)


def lsq_backward(
    grad: Tensor, w: Tensor, step: Tensor, bits: int, signed: bool, numel_full: int
) -> tuple[Tensor, Tensor]:
    qn, qp = lsq_grid(bits, signed)
    dt = _compute_dtype(w)
    s_raw = step.to(dt).reshape(())
    s = s_raw.abs()
    v = w.to(dt) / s
    g = grad.to(dt)
    inside = (v > qn) & (v < qp)  # exclusive (spec 2)
    grad_w = torch.where(inside, g, torch.zeros_like(g)).to(w.dtype)
    term = torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp))
    k = 1.0 / math.sqrt(numel_full * qp)
    grad_step = (g * term).sum(dtype=torch.float64) * k * torch.sign(s_raw).double()
    return grad_w, grad_step.to(dt).reshape(1)


# ----------------------------------------------------------------------------- fused layer epilogue
# The composition of today's ops (BatchNorm -> PyTorch's relu / hardswish -> + residual -> batchquant
# above): the oracle of bquant_kernels.epilogue.bn_act_quant. The backward recomputes BN, the activation
# and the sum from y and the residual and chains the ops' own backward kernels (no autograd: it also runs
# inside an opaque custom op, below autograd, under torch.compile); the quantizer's part is
# batchquant_backward.


def _bn(y: Tensor, gamma: Tensor, beta: Tensor, running: tuple[Tensor, Tensor] | None, eps: float):
    """BN's output and the (mean, invstd) its backward needs (empty in evaluation)."""
    rm, rv = (None, None) if running is None else running
    return torch.native_batch_norm(y, gamma, beta, rm, rv, running is None, 0.0, eps)


def _act(z: Tensor, act: int) -> Tensor:
    return F.relu(z) if act == 1 else F.hardswish(z) if act == 2 else z


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
    """``(out, kept, stats, qparams, aux)``: ``kept`` the quantizer's input ``act(bn(y)) + residual`` when
    ``keep`` (else empty), ``stats`` (2, C) the mean and biased variance BN used, ``qparams`` BatchQuant's
    (zeros without quantizer), ``aux`` empty (the backward recomputes from ``y`` and ``residual``)."""
    dt = _compute_dtype(y)
    if running_mean is None:
        var, mean = torch.var_mean(y.to(dt), dim=[d for d in range(y.dim()) if d != 1], correction=0)
        stats, running = torch.stack([mean, var]), None
    else:
        stats = torch.stack([running_mean.to(dt), running_var.to(dt)])
        running = (stats[0], stats[1])
    s = _act(_bn(y, gamma, beta, running, eps)[0], act)
    if residual is not None:
        s = s + residual  # a y.dtype add, rounded as the composition's
    kept = s if keep else y.new_empty(0)
    aux = y.new_empty(0, dtype=dt)
    if bits == 0:
        return s, kept, stats, y.new_zeros(NUM_QPARAMS, dtype=dt), aux
    out, qp = batchquant_forward(s, theta, offset, lo_hi, bits, signed, C, inner)
    return out, kept, stats, qp, aux


def bn_act_quant_backward(
    grad_out: Tensor,
    grad_act: Tensor | None,
    y: Tensor,
    residual: Tensor | None,
    gamma: Tensor,
    beta: Tensor,
    stats: Tensor,
    aux: Tensor,
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
    """``(grad_y, grad_residual, grad_gamma, grad_beta, grad_theta[1], grad_offset[1])`` (scalars zero
    without quantizer, ``grad_residual`` empty without residual). ``grad_act``: the gradient into ``kept``
    (``None``: none), added to the quantizer's input gradient as autograd adds the two uses of it."""
    running = None if batch_stats else (stats[0].to(gamma.dtype), stats[1].to(gamma.dtype))
    z, mean, invstd = _bn(y, gamma, beta, running, eps)
    if bits == 0:
        grad_s, grad_theta = grad_out, qparams.new_zeros(1)
        grad_offset = grad_theta.clone()
    else:
        s = _act(z, act)
        s = s if residual is None else s + residual
        grad_s, grad_theta, grad_offset = batchquant_backward(grad_out, s, offset, qparams, bits, signed)
    if grad_act is not None:
        grad_s = grad_s + grad_act
    grad_residual = y.new_empty(0) if residual is None else grad_s
    if act == 1:
        grad_z = torch.ops.aten.threshold_backward(grad_s, z, 0)
    elif act == 2:
        grad_z = torch.ops.aten.hardswish_backward(grad_s, z)
    else:
        grad_z = grad_s
    rm, rv = (None, None) if running is None else running
    grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
        grad_z, y, gamma, rm, rv, mean, invstd, batch_stats, eps, [True, True, True]
    )
    return grad_y, grad_residual, grad_gamma, grad_beta, grad_theta, grad_offset


# ----------------------------------------------------------------------------- gated BatchQuant


def _gate_view(gate: Tensor, x: Tensor) -> Tensor:
    """The ``(N, C)`` gate broadcast over ``x``'s spatial dimensions."""
    return gate.reshape(gate.shape + (1,) * (x.dim() - 2))


def gated_batchquant_forward(
    x: Tensor, gate: Tensor, theta: Tensor, offset: Tensor, lo_hi: Tensor | None, bits: int, signed: bool, C: int,
    inner: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """BatchQuant of ``x * gate`` (one gate value per sample and channel): the composition, materialized."""
    return batchquant_forward(x * _gate_view(gate, x), theta, offset, lo_hi, bits, signed, C, inner)


def gated_batchquant_backward(
    grad_y: Tensor, x: Tensor, gate: Tensor, offset: Tensor, qp: Tensor, bits: int, signed: bool, C: int, inner: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_gate (N, C), grad_theta, grad_offset)``: BatchQuant's backward on ``z = x * gate``, then
    the multiply's (each product in ``x``'s dtype, the gate's sums accumulated in the compute dtype)."""
    g = _gate_view(gate, x)
    grad_z, grad_theta, grad_offset = batchquant_backward(grad_y, x * g, offset, qp, bits, signed)
    prod = grad_z * x
    dims = tuple(range(2, x.dim()))
    grad_gate = prod.sum(dims, dtype=_compute_dtype(x)).to(x.dtype) if dims else prod
    return grad_z * g, grad_gate, grad_theta, grad_offset
