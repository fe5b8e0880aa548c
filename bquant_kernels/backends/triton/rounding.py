"""Round half to even inside Triton kernels, bit-exact on the GPU and under the CPU interpreter."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import INTERPRET


@triton.jit
def round_half_even_portable(v):
    """``rint(v)`` from ``floor`` alone, exact for every fp32/fp64 value.

    Not ``floor(v + 0.5)``: that sum itself rounds (0.49999997 -> 1, 2^23 + 1 -> 2^23 + 2).
    ``v - floor(v)`` is exact, ties go to the even neighbour, values too large to have a
    fraction come back unchanged, and inf/NaN pass through. rint keeps the sign of ``v``
    (-0.3 -> -0.0); that sign is copied with integer ops, since the GPU compiler folds
    float tricks like -((-r) - 1) as if zeros had no sign.
    """
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    rounded = tl.abs(tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r))
    if v.dtype == tl.float64:
        sign = v.to(tl.uint64, bitcast=True) & 0x8000000000000000
        return (rounded.to(tl.uint64, bitcast=True) | sign).to(tl.float64, bitcast=True)
    else:
        sign = v.to(tl.uint32, bitcast=True) & 0x80000000
        return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def round_half_even_rint(v):
    """``rint(v)`` from libdevice: one instruction on the GPU; not implemented by the interpreter."""
    return libdevice.rint(v)


# What the kernels call. Chosen here rather than by a branch inside one jit function: under the
# interpreter every nested jit call costs milliseconds.
round_half_even = round_half_even_portable if INTERPRET else round_half_even_rint


@triton.jit
def _cast(v, dtype: tl.constexpr):
    return v.to(dtype)


@triton.jit
def _cast_interpreter(v, dtype: tl.constexpr):
    # The interpreter truncates float32 -> bfloat16 (triton 3.8), so round on the bits: add 0x7FFF
    # plus the lowest kept bit, drop the low 16 bits. NaN becomes 0x7FC0, as in c10.
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = tl.where(v != v, 0x7FC00000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


# ``cast_rne(v, dtype)``: float32 ``v`` in ``dtype``, rounded to nearest even (as ``Tensor.to`` does).
cast_rne = _cast_interpreter if INTERPRET else _cast
