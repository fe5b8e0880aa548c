"""Argument checks of the public ops, shared by every backend: each raises an error naming the argument.

They run once per call, in Python, before a backend is chosen; the native ops check again in C++
(csrc/ops.cpp) for callers of ``torch.ops.bquant.*`` that bypass this package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, *, min_dim: int = 0) -> Tensor:
    """``t`` is a non-empty floating tensor with at least ``min_dim`` dimensions."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions (N, C, ...), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def check_param(name: str, t: object, ref: Tensor, ref_name: str = "the input", numel: int = 1) -> Tensor:
    """``t`` is a floating tensor of ``numel`` elements (any shape) on the device of ``ref``."""
    t = check_tensor(name, t)
    if t.numel() != numel:
        raise ValueError(f"{name} must have exactly {numel} element(s), got shape {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return t


def check_batchquant_args(x: Tensor, theta: object, offset: object, bits: object, lo_hi: object) -> Tensor | None:
    """The quantizer arguments of :func:`bquant_kernels.batchquant` (and of its gated form) for input ``x``:
    one-element ``theta`` and ``offset`` on ``x``'s device, ``bits`` in [2, 8], an optional 2-element
    ``lo_hi``, returned as shape ``(2,)``."""
    check_param("theta", theta, x)
    check_param("offset", offset, x)
    check_bits("bits", bits, 2, 8)
    if lo_hi is None:
        return None
    return check_param("lo_hi", lo_hi, x, numel=2).reshape(2)


def check_bits(name: str, bits: object, lo: int, hi: int) -> int:
    """``bits`` is an int (not a bool) in ``[lo, hi]``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int, got {type(bits).__name__}")
    if not lo <= bits <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {bits}")
    return bits


def check_numel_full(name: str, numel_full: object, w: Tensor, w_name: str = "w") -> int:
    """``numel_full`` is an int >= ``w.numel()``."""
    if isinstance(numel_full, bool) or not isinstance(numel_full, int) or numel_full < w.numel():
        raise ValueError(f"{name} must be an int >= {w_name}.numel() ({w.numel()}), got {numel_full!r}")
    return numel_full


def check_lsq_multi(
    weights: Sequence[object], steps: Sequence[object], bits: Sequence[object], numel_full: Sequence[object] | None
) -> list[int]:
    """Every entry of the (equally long) lists of :func:`bquant_kernels.lsq_multi`, before any kernel runs:
    one device and dtype for the weights, each step a 1-element floating tensor on its weight's device,
    bits in [1, 8], numel_full >= numel (default: each weight's numel). Returns the numel_full list."""
    full = []
    for i, (w, s, b) in enumerate(zip(weights, steps, bits, strict=True)):
        check_tensor(f"weights[{i}]", w)
        if w.device != weights[0].device or w.dtype != weights[0].dtype:
            raise ValueError(
                f"weights must share one device and dtype: weights[{i}] is {w.dtype} on {w.device}, "
                f"weights[0] is {weights[0].dtype} on {weights[0].device}"
            )
        check_param(f"steps[{i}]", s, w, f"weights[{i}]")
        check_bits(f"bits[{i}]", b, 1, 8)
        nf = w.numel() if numel_full is None else numel_full[i]
        full.append(check_numel_full(f"numel_full[{i}]", nf, w, f"weights[{i}]"))
    return full
