"""Functional ops: validation, memory layout, the ``torch.library`` custom ops and their autograd.

The custom ops (``torch.ops.bquant.*``) take a resolved backend name and dispatch to
``bquant_kernels.backends``; their fake implementations let ``torch.compile`` trace a model that
uses them without graph breaks. Eager calls of the Python-registered backends go through
autograd.Functions that call the same implementations without the dispatcher round trips.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ext
from .backends import get as _get_backend
from .backends import resolve as _resolve_backend
from .qparams import NUM_QPARAMS, lsq_grid

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, t: object, *, min_dim: int = 0) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions (N, C, ...), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def _check_param(name: str, t: object, ref: Tensor, numel: int = 1) -> Tensor:
    t = _check_tensor(name, t)
    if t.numel() != numel:
        raise ValueError(f"{name} must have exactly {numel} element(s), got shape {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}")
    return t


def _check_bits(name: str, bits: object, lo: int, hi: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int, got {type(bits).__name__}")
    if not lo <= bits <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {bits}")
    return bits


def _layout(x: Tensor) -> tuple[Tensor, int, int]:
    """``x`` as a dense contiguous or channels_last tensor, with its ``(C, inner)`` (see backends)."""
    C = x.shape[1]
    if x.is_contiguous():
        return x, C, x.numel() // (x.shape[0] * C)
    channels_last = x.permute(0, *range(2, x.dim()), 1)
    if channels_last.is_contiguous():
        return x, C, 1
    return x.contiguous(), C, x.numel() // (x.shape[0] * C)


def _like(src: Tensor, ref: Tensor) -> Tensor:
    """``src`` with the strides of ``ref`` (a copy only when they differ)."""
    if src.stride() == ref.stride():
        return src
    out = torch.empty_like(ref, dtype=src.dtype)
    return out.copy_(src)


def _qparams_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- custom ops


# The Python-registered backends (reference, triton) have their implementations here, each used two
# ways: eagerly through an autograd.Function that calls it directly, and as a torch.library custom op
# (fake implementation, registered autograd) that torch.compile traces. The custom op alone would do
# for both, but each eager call of it crosses between Python and the dispatcher several times: 60-70
# us per call and direction on this repository's CPU machine, against about 10 for the Function.


def _batch_range_impl(x: Tensor, backend: str) -> Tensor:
    xl, C, inner = _layout(x)
    return _get_backend(backend).batch_range(xl, C, inner)


def _batchquant_fwd_impl(
    x: Tensor, theta: Tensor, offset: Tensor, lo_hi: Tensor | None, bits: int, signed: bool, backend: str
) -> tuple[Tensor, Tensor]:
    xl, C, inner = _layout(x)
    y, qp = _get_backend(backend).batchquant_forward(xl, theta, offset, lo_hi, bits, signed, C, inner)
    return _like(y, x), qp


def _batchquant_bwd_impl(
    grad_y: Tensor, x: Tensor, offset: Tensor, qparams: Tensor, bits: int, signed: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    xl, _, _ = _layout(x)
    gx, gt, go = _get_backend(backend).batchquant_backward(_like(grad_y, xl), xl, offset, qparams, bits, signed)
    return _like(gx, x), gt, go


def _lsq_fwd_impl(w: Tensor, step: Tensor, bits: int, signed: bool, numel_full: int, backend: str) -> Tensor:
    return _like(_get_backend(backend).lsq_forward(w.contiguous(), step, bits, signed), w)


def _lsq_bwd_impl(
    grad: Tensor, w: Tensor, step: Tensor, bits: int, signed: bool, numel_full: int, backend: str
) -> tuple[Tensor, Tensor]:
    wc = w.contiguous()
    gw, gs = _get_backend(backend).lsq_backward(_like(grad, wc), wc, step, bits, signed, numel_full)
    return _like(gw, w), gs


# ----------------------------------------------------------------------------- custom ops (torch.compile)

_batch_range_op = torch.library.custom_op("bquant::batch_range", _batch_range_impl, mutates_args=())
_batchquant_fwd_op = torch.library.custom_op("bquant::batchquant_fwd", _batchquant_fwd_impl, mutates_args=())
_batchquant_bwd_op = torch.library.custom_op("bquant::batchquant_bwd", _batchquant_bwd_impl, mutates_args=())
_lsq_fwd_op = torch.library.custom_op("bquant::lsq_fwd", _lsq_fwd_impl, mutates_args=())
_lsq_bwd_op = torch.library.custom_op("bquant::lsq_bwd", _lsq_bwd_impl, mutates_args=())


@_batch_range_op.register_fake
def _(x, backend):
    return x.new_empty(2, dtype=torch.float32)


@_batchquant_fwd_op.register_fake
def _(x, theta, offset, lo_hi, bits, signed, backend):
    return torch.empty_like(x), x.new_empty(NUM_QPARAMS, dtype=_qparams_dtype(x))


@_batchquant_bwd_op.register_fake
def _(grad_y, x, offset, qparams, bits, signed, backend):
    return torch.empty_like(x), qparams.new_empty(1), qparams.new_empty(1)


@_lsq_fwd_op.register_fake
def _(w, step, bits, signed, numel_full, backend):
    return torch.empty_like(w)


@_lsq_bwd_op.register_fake
def _(grad, w, step, bits, signed, numel_full, backend):
    return torch.empty_like(w), w.new_empty(1, dtype=_qparams_dtype(w))


# ----------------------------------------------------------------------------- autograd (both ways)


def _batchquant_setup(ctx, inputs, output) -> None:
    x, theta, offset, _lo_hi, bits, signed, backend = inputs
    ctx.save_for_backward(x, offset, output[1])
    ctx.args = (bits, signed, backend, theta.dtype, offset.dtype)


def _batchquant_grads(ctx, grad_y: Tensor | None, backward) -> tuple:
    x, offset, qp = ctx.saved_tensors
    bits, signed, backend, theta_dtype, offset_dtype = ctx.args
    if grad_y is None:  # only the range was used
        grad_y = torch.zeros_like(x)
    gx, gt, go = backward(grad_y, x, offset, qp, bits, signed, backend)
    return gx, gt.to(theta_dtype), go.to(offset_dtype), None, None, None, None


def _lsq_setup(ctx, inputs, output) -> None:
    w, step, bits, signed, numel_full, backend = inputs
    ctx.save_for_backward(w, step)
    ctx.args = (bits, signed, numel_full, backend)


def _lsq_grads(ctx, grad: Tensor, backward) -> tuple:
    w, step = ctx.saved_tensors
    bits, signed, numel_full, backend = ctx.args
    gw, gs = backward(grad, w, step, bits, signed, numel_full, backend)
    return gw, gs.to(step.dtype), None, None, None, None


_batchquant_fwd_op.register_autograd(
    lambda ctx, grad_y, _grad_qparams: _batchquant_grads(ctx, grad_y, torch.ops.bquant.batchquant_bwd),
    setup_context=_batchquant_setup,
)
_lsq_fwd_op.register_autograd(
    lambda ctx, grad: _lsq_grads(ctx, grad, torch.ops.bquant.lsq_bwd), setup_context=_lsq_setup
)


class _BatchQuantFunction(torch.autograd.Function):
    """Eager BatchQuant of the Python-registered backends: the implementation called directly."""

    @staticmethod
    def forward(ctx, x, theta, offset, lo_hi, bits, signed, backend):
        y, qp = _batchquant_fwd_impl(x, theta, offset, lo_hi, bits, signed, backend)
        _batchquant_setup(ctx, (x, theta, offset, lo_hi, bits, signed, backend), (y, qp))
        ctx.mark_non_differentiable(qp)
        ctx.set_materialize_grads(False)  # no zeros for the qparams output
        return y, qp

    @staticmethod
    def backward(ctx, grad_y, _grad_qparams):
        return _batchquant_grads(ctx, grad_y, _batchquant_bwd_impl)


class _LSQFunction(torch.autograd.Function):
    """Eager LSQ of the Python-registered backends: the implementation called directly."""

    @staticmethod
    def forward(ctx, w, step, bits, signed, numel_full, backend):
        out = _lsq_fwd_impl(w, step, bits, signed, numel_full, backend)
        _lsq_setup(ctx, (w, step, bits, signed, numel_full, backend), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _lsq_grads(ctx, grad, _lsq_bwd_impl)


# ----------------------------------------------------------------------------- native ops (csrc/ops.cpp)

# The cpu and cuda backends are also registered with the dispatcher from C++, layout handling and
# autograd included, so that a call crosses from Python into C++ once: torch.ops.bquant.native_*.
# These are their shapes for torch.compile.
_NATIVE = ("cpu", "cuda")

if _ext.ext is not None:

    def _fake_batchquant(x, theta, offset, lo_hi, bits, signed):
        return torch.empty_like(x), x.new_empty(NUM_QPARAMS, dtype=_qparams_dtype(x))

    torch.library.register_fake("bquant::native_batchquant", _fake_batchquant)
    torch.library.register_fake("bquant::native_batchquant_fwd", _fake_batchquant)

    @torch.library.register_fake("bquant::native_batchquant_bwd")
    def _(grad_y, x, offset, qparams, bits, signed):
        return torch.empty_like(x), qparams.new_empty(1), qparams.new_empty(1)

    @torch.library.register_fake("bquant::native_batch_range")
    def _(x):
        return x.new_empty(2, dtype=torch.float32)

    def _fake_lsq(w, step, bits, signed, numel_full):
        return torch.empty_like(w)

    torch.library.register_fake("bquant::native_lsq", _fake_lsq)
    torch.library.register_fake("bquant::native_lsq_fwd", _fake_lsq)

    @torch.library.register_fake("bquant::native_lsq_bwd")
    def _(grad, w, step, bits, signed, numel_full):
        return torch.empty_like(w), w.new_empty(1, dtype=_qparams_dtype(w))

    def _fake_lsq_multi(weights, steps, bits, signed, numel_full=None):
        return [torch.empty_like(w) for w in weights]

    torch.library.register_fake("bquant::native_lsq_multi", _fake_lsq_multi)
    torch.library.register_fake("bquant::native_lsq_multi_fwd", _fake_lsq_multi)

    @torch.library.register_fake("bquant::native_lsq_multi_bwd")
    def _(grads, weights, steps, bits, signed, numel_full):
        dtype = _qparams_dtype(weights[0]) if weights else torch.float32
        grad_steps = weights[0].new_empty(len(weights), dtype=dtype) if weights else torch.empty(0)
        return [torch.empty_like(w) for w in weights], grad_steps


# ----------------------------------------------------------------------------- public API


def batch_range(x: Tensor, *, backend: str | None = None) -> Tensor:
    """float32 ``[lo, hi]``: the means over channels (dim 1) of per-channel min and max (spec 1.1).

    A NaN anywhere in ``x`` makes the range NaN, like ``torch.amin``/``torch.amax``.
    """
    _check_tensor("x", x, min_dim=2)
    name = _resolve_backend(backend, x.device, x.dtype)
    x = x.detach()  # statistics are constants for autograd
    if name in _NATIVE:
        return torch.ops.bquant.native_batch_range(x)
    if torch.compiler.is_compiling():
        return torch.ops.bquant.batch_range(x, name)
    return _batch_range_impl(x, name)


def batchquant(
    x: Tensor,
    theta: Tensor,
    offset: Tensor,
    bits: int,
    *,
    signed: bool = False,
    lo_hi: Tensor | None = None,
    return_range: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """BatchQuant fake-quantization of ``x`` (channel axis 1), per docs/spec-batchquant.md.

    Args:
        x: ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)`` activations, contiguous or channels_last,
            float16/bfloat16/float32 (and float64 on the reference and cpu backends).
        theta: 1-element raw scale parameter; the multiplier is ``softplus(theta; beta=ln 2)``.
        offset: 1-element offset parameter, in quantization steps.
        bits: bit-width, 2..8.
        signed: signed integer grid (identical output for ``bits >= 2`` except all-zero input).
        lo_hi: optional ``[lo, hi]`` used instead of the batch statistics (evaluation).
        return_range: also return the ``[lo, hi]`` that was used, as a device tensor (no host sync).
        backend: ``"reference" | "cpu" | "triton" | "cuda"``; default: the fastest available for
            ``x``'s device (env ``BQUANT_BACKEND`` overrides).

    Returns:
        ``y`` (same shape, dtype and memory format as ``x``), or ``(y, lo_hi_used)``.
        Differentiable in ``x``, ``theta`` and ``offset`` (straight-through rounding, inclusive
        clamp mask). NaN in ``x`` propagates: in training mode it makes the batch range and so all
        of ``y`` NaN (like ``torch.amin``); with ``lo_hi`` only the NaN elements become NaN.
    """
    _check_tensor("x", x, min_dim=2)
    _check_param("theta", theta, x)
    _check_param("offset", offset, x)
    _check_bits("bits", bits, 2, 8)
    if lo_hi is not None:
        _check_param("lo_hi", lo_hi, x, numel=2)
        lo_hi = lo_hi.reshape(2)
    name = _resolve_backend(backend, x.device, x.dtype)
    if name in _NATIVE:
        y, qp = torch.ops.bquant.native_batchquant(x, theta, offset, lo_hi, bits, bool(signed))
    elif torch.compiler.is_compiling():
        y, qp = torch.ops.bquant.batchquant_fwd(x, theta, offset, lo_hi, bits, bool(signed), name)
    else:
        y, qp = _BatchQuantFunction.apply(x, theta, offset, lo_hi, bits, bool(signed), name)
    return (y, qp[:2].detach()) if return_range else y  # the range is a constant for autograd


def lsq(
    w: Tensor,
    step: Tensor,
    bits: int,
    *,
    signed: bool = True,
    numel_full: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """LSQ fake-quantization of a weight tensor (spec 2), differentiable in ``w`` and ``step``.

    ``numel_full`` is the element count of the full shared weight when ``w`` is a slice of it
    (the gradient scale is ``1 / sqrt(numel_full * Qp)``); it defaults to ``w.numel()``.
    """
    _check_tensor("w", w)
    _check_param("step", step, w)
    _check_bits("bits", bits, 1, 8)
    if numel_full is None:
        numel_full = w.numel()
    elif not isinstance(numel_full, int) or numel_full < w.numel():
        raise ValueError(f"numel_full must be an int >= w.numel() ({w.numel()}), got {numel_full!r}")
    name = _resolve_backend(backend, w.device, w.dtype)
    if name in _NATIVE:
        return torch.ops.bquant.native_lsq(w, step, bits, bool(signed), numel_full)
    if torch.compiler.is_compiling():
        return torch.ops.bquant.lsq_fwd(w, step, bits, bool(signed), numel_full, name)
    return _LSQFunction.apply(w, step, bits, bool(signed), numel_full, name)


def lsq_grad_scale(numel_full: int, bits: int, signed: bool = True) -> float:
    """The LSQ step-gradient scale ``1 / sqrt(numel_full * Qp)``."""
    return 1.0 / math.sqrt(numel_full * lsq_grid(bits, signed)[1])
