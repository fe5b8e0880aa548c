"""Per-element BatchQuant / LSQ math for the Triton kernels: a line-by-line mirror of
``csrc/common/quant_math.h`` (same float32 expressions in the same order; the observer and the
softplus in float64), so that every backend produces the same numbers.

fp32 division is ``div_rn``: triton's ``/`` on fp32 is the approximate ``div.full.f32`` on NVIDIA GPUs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...qparams import LN2, MIN_SCALE, SOFTPLUS_THRESHOLD
from .launch import INTERPRET
from .rounding import round_half_even

_LN2: tl.constexpr = tl.constexpr(LN2)
_MIN_SCALE: tl.constexpr = tl.constexpr(MIN_SCALE)
_SOFTPLUS_THRESHOLD: tl.constexpr = tl.constexpr(SOFTPLUS_THRESHOLD)


# min / max / clamp that propagate NaN, like torch.amin / torch.amax / torch.clamp.
@triton.jit
def nan_min(a, b):
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def nan_max(a, b):
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def clamp_nan(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _softplus_terms_libdevice(bx):
    return libdevice.log1p(libdevice.exp(bx)), libdevice.exp(-bx)


@triton.jit
def _softplus_terms_portable(bx):
    e = tl.exp(bx)
    u = 1.0 + e
    # log1p(e) from log (Goldberg): exact in the rounding of 1 + e, so accurate for tiny e too.
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return log1p_e, tl.exp(-bx)


# float64 (log1p(exp(bx)), exp(-bx)): CUDA's libdevice on the GPU (within 1-2 ulp); NumPy's exp and log
# under the interpreter, which has no libdevice.
_softplus_terms = _softplus_terms_portable if INTERPRET else _softplus_terms_libdevice


@triton.jit
def observer_qparams(lo, hi, qmin, qmax):
    """(lo, hi) -> (S, z) per spec 1.2, in float64; returns float32 ``(scale, zero)``.

    ``z`` is derived from the float32 ``S`` the element pass uses."""
    qmin64 = tl.cast(qmin, tl.float64)  # scalar arguments are Python floats when interpreting
    qmax64 = tl.cast(qmax, tl.float64)
    lo0 = nan_min(lo, 0.0)
    hi0 = nan_max(hi, 0.0)
    s = nan_max((hi0 - lo0) / (qmax64 - qmin64), _MIN_SCALE)
    s32 = s.to(tl.float32)
    z = clamp_nan(qmin64 - round_half_even(lo0 / s32.to(tl.float64)), qmin64, qmax64)
    degenerate = hi0 == lo0
    scale = tl.where(degenerate, 1.0, s32)
    zero = tl.where(degenerate, 0.0, z.to(tl.float32))
    return scale, zero


@triton.jit
def softplus_ln2(theta):
    """float64 ``theta`` -> float32 ``(l, dl/dtheta)``: softplus with beta = ln 2 and PyTorch's threshold."""
    bx = theta * _LN2
    above = bx > _SOFTPLUS_THRESHOLD
    bx_safe = tl.where(above, 0.0, bx)  # no exp overflow on the branch that is thrown away
    log1p_exp, exp_neg = _softplus_terms(bx_safe)
    l = log1p_exp / _LN2
    dl = 1.0 / (1.0 + exp_neg)
    l = tl.where(above, theta, l)
    dl = tl.where(above, 1.0, dl)
    return l.to(tl.float32), dl.to(tl.float32)


@triton.jit
def batchquant_u(x, l, scale, zero, offset):
    """u = x * l / S + z + o (spec 1.4), the same in the forward and the backward."""
    return tl.math.div_rn(x * l, scale) + zero + offset


@triton.jit
def batchquant_y(u, l, scale, zero, offset, qmin, qmax, step, BY_STEP: tl.constexpr):
    """y = (q - z - o) * S / l with q = round(clamp(u)), or ``(q - z - o) * step`` (``step = S / l``)
    with ``BY_STEP``: a multiply where the spec divides, within about one float32 rounding
    (quant_math.h, batchquant_y)."""
    q = round_half_even(clamp_nan(u, qmin, qmax))
    if BY_STEP:
        return (q - zero - offset) * step
    else:
        return tl.math.div_rn((q - zero - offset) * scale, l)


@triton.jit
def batchquant_elem(x, l, scale, zero, offset, qmin, qmax, step, BY_STEP: tl.constexpr):
    """BatchQuant forward of float32 ``x`` (spec 1.4), returns ``y``; ``BY_STEP`` for 16-bit outputs:
    the same 16-bit values but where the two forms straddle a rounding midpoint (quant_math.h)."""
    u = batchquant_u(x, l, scale, zero, offset)
    return batchquant_y(u, l, scale, zero, offset, qmin, qmax, step, BY_STEP)


@triton.jit
def batchquant_elem_backward(g, x, l, scale, zero, offset, qmin, qmax, step):
    """Backward contributions of one element (spec 1.5) before the constant factors:
    ``(grad_x, dl_term, do_term)`` with grad_l = sum(dl_term) / l and grad_o = -sum(do_term) * S / l.

    ``u`` (so q and the mask) is the forward's bit for bit; the y that only feeds the dl sum is the
    ``step`` form (quant_math.h, batchquant_elem_backward)."""
    u = batchquant_u(x, l, scale, zero, offset)
    inside = (u >= qmin) & (u <= qmax)
    y = batchquant_y(u, l, scale, zero, offset, qmin, qmax, step, True)
    grad_x = tl.where(inside, g, 0.0)
    dl_term = tl.where(inside, g * (x - y), -g * y)
    do_term = tl.where(inside, 0.0, g)
    return grad_x, dl_term, do_term


@triton.jit
def lsq_elem(w, abs_step, qn, qp):
    """LSQ forward (spec 2): |s| * round(clamp(w / |s|, Qn, Qp))."""
    v = tl.math.div_rn(w, abs_step)
    return round_half_even(clamp_nan(v, qn, qp)) * abs_step


@triton.jit
def lsq_elem_backward(g, w, abs_step, qn, qp):
    """``(grad_w, ds_term)``: the exclusive mask Qn < v < Qp, and g * (round(v) - v inside, clamp(v) outside)."""
    v = tl.math.div_rn(w, abs_step)
    inside = (v > qn) & (v < qp)
    grad_w = tl.where(inside, g, 0.0)
    ds_term = tl.where(inside, g * (round_half_even(v) - v), g * clamp_nan(v, qn, qp))
    return grad_w, ds_term
