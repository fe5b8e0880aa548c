"""The published QFA/BatchQuant eager formulation: the speed baseline of ``bench/kernels.py``.

A reimplementation of how the authors' code (apple/ml-batchquant, ``quantize_utils.py`` and
``observer.py``) ran on every call, op for op, so that the benchmark measures what the fused
kernels replace:

- the batch range goes through a permuted copy, ``x.transpose(0, 1).reshape(C, -1)``, then
  ``torch.min``/``torch.max`` along dim 1 (values *and* indices) and two means;
- the observer scale and zero point are computed on the host in float64 from Python floats, which
  costs three host syncs per call (the ``min <= max`` assertion and two ``float()``), and are sent
  back as two fresh device tensors;
- the fake-quant is ~10 eager elementwise ops with an autograd straight-through round; LSQ uses the
  ``gradscale``/``roundpass`` detach tricks and ``hardtanh`` as its clamp.

Deviations from the published code, both so that it computes the function of
docs/spec-batchquant.md:

- half-precision inputs: the channel means are taken in float32 (the original averaged in the input
  dtype) and ``y`` is cast back to the input dtype (the original returned float32, by promotion
  against the float32 parameters);
- the optional LSQ-style gradient scale of BatchQuant (off by default in the original) and the 1-bit
  ``sign`` weight quantizer are not reproduced.

Known difference from the spec, depending on the PyTorch version: at the clamp boundary
(``u == qmin`` or ``u == qmax`` exactly, e.g. post-ReLU zeros with ``z + o == qmin``) the gradient
of ``torch.clamp`` is 0 in torch 2.14 (torch 2.11 still passes it, as the spec and the PyTorch of the
published runs do). There ``grad_x`` is 0 instead of ``g``, and those elements count as "out" for
``grad_theta``/``grad_offset``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bquant_kernels.qparams import LN2, MIN_SCALE, batchquant_grid, lsq_grid


class _RoundSTE(torch.autograd.Function):
    """``round`` with a straight-through gradient (the published ``FakeRoundOp``)."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        return torch.round(u)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _check_scalar_param(name: str, t: object) -> None:
    if not isinstance(t, Tensor) or t.numel() != 1:
        raise ValueError(f"{name} must be a 1-element tensor, got {t!r:.80}")


def published_batch_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` as 0-dim device tensors: means over channels of the per-channel min and max (spec 1.1)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (N, C, ...), got {getattr(x, 'shape', type(x))}")
    x = x.detach()
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)  # the published permuted copy
    mean_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lo = torch.min(per_channel, 1)[0].mean(dtype=mean_dtype)
    hi = torch.max(per_channel, 1)[0].mean(dtype=mean_dtype)
    return lo, hi


def published_qparams(lo: Tensor, hi: Tensor, bits: int, signed: bool) -> tuple[float, int]:
    """The observer's ``(scale, zero_point)`` (spec 1.2), on the host in float64: three host syncs."""
    if not bool(lo <= hi):  # sync 1 (the published assertion)
        raise ValueError(f"batch range is empty or NaN: lo={lo}, hi={hi}")
    hi_f, lo_f = float(hi), float(lo)  # syncs 2 and 3
    qmin, qmax = batchquant_grid(bits, signed)
    lo_f, hi_f = min(0.0, lo_f), max(0.0, hi_f)
    if hi_f == lo_f:
        return 1.0, 0
    scale = max((hi_f - lo_f) / (qmax - qmin), MIN_SCALE)
    zero_point = min(qmax, max(qmin, qmin - round(lo_f / scale)))  # Python round: half to even
    return scale, int(zero_point)


def batchquant_published(x: Tensor, theta: Tensor, offset: Tensor, bits: int, *, signed: bool = False) -> Tensor:
    """BatchQuant fake-quantization with batch statistics, as the published code ran it (training mode)."""
    _check_scalar_param("theta", theta)
    _check_scalar_param("offset", offset)
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    qmin, qmax = batchquant_grid(bits, signed)
    scale, zero_point = published_qparams(*published_batch_range(x), bits, signed)
    observer_scale = torch.tensor([scale], device=x.device)  # float32, like torch.tensor([float])
    zp = torch.tensor([zero_point], device=x.device)  # int64
    l = F.softplus(theta, beta=LN2)
    u = x * l / observer_scale + zp + offset
    q = _RoundSTE.apply(torch.clamp(u, qmin, qmax))
    y = (q - zp - offset) * observer_scale / l
    return y.to(x.dtype)


def _gradscale(t: Tensor, factor: float) -> Tensor:
    """Value ``t``, gradient ``factor * grad`` (LSQ's ``gradscale``)."""
    scaled = t * factor
    return (t - scaled).detach() + scaled


def _roundpass(t: Tensor) -> Tensor:
    """Value ``round(t)``, gradient 1 (LSQ's ``roundpass``)."""
    return (t.round() - t).detach() + t


def lsq_published(w: Tensor, step: Tensor, bits: int, *, signed: bool = True, numel_full: int | None = None) -> Tensor:
    """LSQ weight fake-quantization (spec 2) as the published code ran it; ``numel_full`` sets the gradient scale."""
    _check_scalar_param("step", step)
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8] (the published 1-bit quantizer used sign()), got {bits!r}")
    if numel_full is None:
        numel_full = w.numel()
    qn, qp = lsq_grid(bits, signed)
    s = _gradscale(step, 1.0 / math.sqrt(numel_full * qp))
    v = F.hardtanh(w / s.abs(), qn, qp)  # hardtanh's gradient mask is exclusive, as spec 2 says
    return (_roundpass(v) * s.abs()).to(w.dtype)
