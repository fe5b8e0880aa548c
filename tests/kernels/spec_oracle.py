"""An independent float64 NumPy implementation of docs/spec-batchquant.md, used as the test oracle.

Deliberately written without torch and without sharing code with any backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)


def grid(bits: int, signed: bool) -> tuple[float, float]:
    if signed:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def lsq_grid(bits: int, signed: bool = True) -> tuple[float, float]:
    if not signed:
        return 0.0, 2.0**bits - 1
    if bits == 1:
        return -1.0, 1.0
    return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1


def channel_range(x: np.ndarray) -> tuple[float, float]:
    """Spec 1.1: channel axis 1, min/max over every other axis, mean over channels."""
    xc = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return float(xc.min(axis=1).mean()), float(xc.max(axis=1).mean())


@dataclass
class BQResult:
    y: np.ndarray
    grad_x: np.ndarray
    grad_theta: float
    grad_offset: float
    # sums of |terms|, the natural scale of each scalar gradient's rounding error
    grad_theta_scale: float
    grad_offset_scale: float
    scale: float
    zero: float
    l: float
    lo: float
    hi: float


def batchquant(
    x: np.ndarray, g: np.ndarray, theta: float, offset: float, bits: int, signed: bool, lo_hi=None, scale_dtype=None
) -> BQResult:
    """Forward and backward per spec 1.2-1.5 in float64.

    ``scale_dtype=np.float32`` rounds S to float32 before deriving z, as a device implementation does.
    """
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    qmin, qmax = grid(bits, signed)
    lo, hi = channel_range(x) if lo_hi is None else (float(lo_hi[0]), float(lo_hi[1]))
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    if hi0 == lo0:
        S, z = 1.0, 0.0
    else:
        S = max((hi0 - lo0) / (qmax - qmin), 2.0**-23)
        if scale_dtype is not None:
            S = float(scale_dtype(S))
        z = min(max(qmin - np.round(lo0 / S), qmin), qmax)
    if theta * LN2 > 20:
        l, dl_dtheta = theta, 1.0
    else:
        l = math.log1p(math.exp(theta * LN2)) / LN2
        dl_dtheta = 1.0 / (1.0 + math.exp(-theta * LN2))
    o = offset
    u = x * l / S + z + o
    q = np.round(np.clip(u, qmin, qmax))
    y = (q - z - o) * S / l
    inside = (u >= qmin) & (u <= qmax)
    dy_dl = np.where(inside, (x - y) / l, -(q - z - o) * S / l**2)
    dy_do = np.where(inside, 0.0, -S / l)
    return BQResult(
        y=y,
        grad_x=np.where(inside, g, 0.0),
        grad_theta=float((g * dy_dl).sum() * dl_dtheta),
        grad_offset=float((g * dy_do).sum()),
        grad_theta_scale=float(np.abs(g * dy_dl).sum() * dl_dtheta),
        grad_offset_scale=float(np.abs(g * dy_do).sum()),
        scale=S,
        zero=z,
        l=l,
        lo=lo,
        hi=hi,
    )


@dataclass
class LSQResult:
    w_hat: np.ndarray
    grad_w: np.ndarray
    grad_step: float
    grad_step_scale: float


def lsq(w: np.ndarray, g: np.ndarray, step: float, bits: int, numel_full: int, signed: bool = True) -> LSQResult:
    """Spec 2 in float64."""
    w = np.asarray(w, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    qn, qp = lsq_grid(bits, signed)
    s = abs(step)
    v = w / s
    w_hat = s * np.round(np.clip(v, qn, qp))
    inside = (v > qn) & (v < qp)
    term = np.where(inside, np.round(v) - v, np.clip(v, qn, qp))
    k = 1.0 / math.sqrt(numel_full * qp)
    return LSQResult(
        w_hat=w_hat,
        grad_w=np.where(inside, g, 0.0),
        grad_step=float(k * np.sign(step) * (g * term).sum()),
        grad_step_scale=float(k * np.abs(g * term).sum()),
    )
