"""Functional ops (:func:`batch_range`, :func:`batchquant`, :func:`lsq`) and the two routes a call takes.

Every call is validated once here (``bquant_kernels.checks``), then takes one of two routes:

1. Compiled backends (``cpu``, ``cuda``): the native ops ``torch.ops.bquant.native_*`` of
   ``csrc/ops.cpp``, with layout handling and autograd in C++, so that a call crosses from Python into
   C++ once each way (the per-call cost that small activations and a slow host bound). Their fake
   implementations for ``torch.compile`` are registered below.
2. Python backends (``reference``, ``triton``): the autograd.Functions below, with the layout handling
   of this module. Eagerly they call the backend directly; under ``torch.compile`` the kernel calls go
   through the opaque custom ops ``torch.ops.bquant.{batch_range,batchquant_fwd,batchquant_bwd,lsq_fwd,
   lsq_bwd}`` (fake implementations, no autograd of their own: dynamo traces the Function around them,
   and does not trace into Triton launch code). Eagerly the ops are skipped because each call of a
   Python ``torch.library`` op crosses between Python and the dispatcher: with the kernels stubbed out, a
   ``batchquant`` call took 8.0-14.1 us forward and 36.3-65.7 us forward+backward calling the backend
   directly, against 13.6-41.6 and 50.4-94.5 us through the ops (``KERNEL_OPS_EAGERLY``; three runs of
   ``python bench/host_overhead.py``, CPU VM, 1 thread, interleaved, 2026-12-06; the last one in
   ``bench/results/host-overhead-cpu-2026-12-06.json``). One route through ``torch.library`` ops with
   their own autograd, as before, cost 60-70 us per call and direction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import extension
from .backends import NATIVE, get_backend, resolve
from .checks import check_batchquant_args, check_bits, check_numel_full, check_param, check_tensor
from .qparams import NUM_QPARAMS, lsq_grid

# ----------------------------------------------------------------------------- layout (route 2)


def dense_activation(x: Tensor) -> tuple[Tensor, int, int]:
    """``x`` as the kernels walk it, with its ``(C, inner)`` (backend contract, ``backends/__init__.py``):
    itself when contiguous or channels-innermost, else a contiguous copy."""
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


def _as_param(grad: Tensor, param: Tensor) -> Tensor:
    """A kernel's ``[1]`` scalar gradient in the shape and dtype of its 1-element parameter."""
    return grad.reshape(param.shape).to(param.dtype)


# ----------------------------------------------------------------------------- kernel calls (route 2)


def _batch_range_impl(x: Tensor, backend: str) -> Tensor:
    xl, C, inner = dense_activation(x)
    return get_backend(backend).batch_range(xl, C, inner)


def _batchquant_fwd_impl(
    x: Tensor, theta: Tensor, offset: Tensor, lo_hi: Tensor | None, bits: int, signed: bool, backend: str
) -> tuple[Tensor, Tensor]:
    xl, C, inner = dense_activation(x)
    y, qp = get_backend(backend).batchquant_forward(xl, theta, offset, lo_hi, bits, signed, C, inner)
    return _like(y, x), qp


def _batchquant_bwd_impl(
    grad_y: Tensor, x: Tensor, offset: Tensor, qparams: Tensor, bits: int, signed: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    xl, _, _ = dense_activation(x)
    gx, gt, go = get_backend(backend).batchquant_backward(_like(grad_y, xl), xl, offset, qparams, bits, signed)
    return _like(gx, x), gt, go


def _lsq_fwd_impl(w: Tensor, step: Tensor, bits: int, signed: bool, numel_full: int, backend: str) -> Tensor:
    return _like(get_backend(backend).lsq_forward(w.contiguous(), step, bits, signed), w)


def _lsq_bwd_impl(
    grad: Tensor, w: Tensor, step: Tensor, bits: int, signed: bool, numel_full: int, backend: str
) -> tuple[Tensor, Tensor]:
    wc = w.contiguous()
    gw, gs = get_backend(backend).lsq_backward(_like(grad, wc), wc, step, bits, signed, numel_full)
    return _like(gw, w), gs


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


# True: route 2 calls the kernel ops eagerly too, as torch.compile does (bench/host_overhead.py times
# both; also a way to debug the compiled path without compiling).
KERNEL_OPS_EAGERLY = False


def _kernel(eager, op):
    """The eager implementation, or under ``torch.compile`` its opaque custom op."""
    return op if KERNEL_OPS_EAGERLY or torch.compiler.is_compiling() else eager


# ----------------------------------------------------------------------------- autograd (route 2)


class _BatchQuantFunction(torch.autograd.Function):
    """BatchQuant of the Python backends. Saves x, offset and the qparams; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, x, theta, offset, lo_hi, bits, signed, backend):
        forward = _kernel(_batchquant_fwd_impl, torch.ops.bquant.batchquant_fwd)
        y, qp = forward(x, theta, offset, lo_hi, bits, signed, backend)
        ctx.save_for_backward(x, theta, offset, qp)
        ctx.args = (bits, signed, backend)
        ctx.mark_non_differentiable(qp)
        ctx.set_materialize_grads(False)  # no zeros for the qparams output, which never has a gradient
        return y, qp

    @staticmethod
    def backward(ctx, grad_y, _grad_qparams):
        x, theta, offset, qp = ctx.saved_tensors
        bits, signed, backend = ctx.args
        if grad_y is None:  # only the range was used
            grad_y = torch.zeros_like(x)
        backward = _kernel(_batchquant_bwd_impl, torch.ops.bquant.batchquant_bwd)
        gx, gt, go = backward(grad_y, x, offset, qp, bits, signed, backend)
        return gx, _as_param(gt, theta), _as_param(go, offset), None, None, None, None


class _LSQFunction(torch.autograd.Function):
    """LSQ of the Python backends."""

    @staticmethod
    def forward(ctx, w, step, bits, signed, numel_full, backend):
        out = _kernel(_lsq_fwd_impl, torch.ops.bquant.lsq_fwd)(w, step, bits, signed, numel_full, backend)
        ctx.save_for_backward(w, step)
        ctx.args = (bits, signed, numel_full, backend)
        return out

    @staticmethod
    def backward(ctx, grad):
        w, step = ctx.saved_tensors
        bits, signed, numel_full, backend = ctx.args
        gw, gs = _kernel(_lsq_bwd_impl, torch.ops.bquant.lsq_bwd)(grad, w, step, bits, signed, numel_full, backend)
        return gw, _as_param(gs, step), None, None, None, None


# ----------------------------------------------------------------------------- native ops (route 1)

if extension.ext is not None:

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
    check_tensor("x", x, min_dim=2)
    name = resolve(backend, x.device, x.dtype)
    x = x.detach()  # statistics are constants for autograd
    if name in NATIVE:
        return torch.ops.bquant.native_batch_range(x)
    return _kernel(_batch_range_impl, torch.ops.bquant.batch_range)(x, name)


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
        theta: 1-element raw scale parameter (any shape); the multiplier is ``softplus(theta; beta=ln 2)``.
        offset: 1-element offset parameter (any shape), in quantization steps.
        bits: bit-width, 2..8.
        signed: signed integer grid (identical output for ``bits >= 2`` except all-zero input).
        lo_hi: optional ``[lo, hi]`` used instead of the batch statistics (evaluation).
        return_range: also return the ``[lo, hi]`` that was used, as a device tensor (no host sync).
        backend: ``"reference" | "cpu" | "triton" | "cuda"``; default: the fastest available for
            ``x``'s device (env ``BQUANT_BACKEND`` overrides).

    Returns:
        ``y`` (same shape, dtype and memory format as ``x``), or ``(y, lo_hi_used)``.
        Differentiable in ``x``, ``theta`` and ``offset`` (straight-through rounding, inclusive
        clamp mask); the gradients have the shapes of the parameters. NaN in ``x`` propagates: in
        training mode it makes the batch range and so all of ``y`` NaN (like ``torch.amin``); with
        ``lo_hi`` only the NaN elements become NaN. For ±inf see docs/spec-batchquant.md, 1.7.
    """
    check_tensor("x", x, min_dim=2)
    lo_hi = check_batchquant_args(x, theta, offset, bits, lo_hi)
    name = resolve(backend, x.device, x.dtype)
    if name in NATIVE:
        y, qp = torch.ops.bquant.native_batchquant(x, theta, offset, lo_hi, bits, bool(signed))
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

    ``step`` is a 1-element tensor of any shape (its gradient has that shape). ``numel_full`` is the
    element count of the full shared weight when ``w`` is a slice of it (the gradient scale is
    ``1 / sqrt(numel_full * Qp)``); it defaults to ``w.numel()``.
    """
    check_tensor("w", w)
    check_param("step", step, w, "w")
    check_bits("bits", bits, 1, 8)
    numel_full = w.numel() if numel_full is None else check_numel_full("numel_full", numel_full, w)
    return lsq_checked(w, step, bits, bool(signed), numel_full, resolve(backend, w.device, w.dtype))


def lsq_checked(w: Tensor, step: Tensor, bits: int, signed: bool, numel_full: int, backend: str) -> Tensor:
    """:func:`lsq` on arguments already checked, with a resolved backend name (for ``lsq_multi``)."""
    if backend in NATIVE:
        return torch.ops.bquant.native_lsq(w, step, bits, signed, numel_full)
    return _LSQFunction.apply(w, step, bits, signed, numel_full, backend)


def lsq_grad_scale(numel_full: int, bits: int, signed: bool = True) -> float:
    """The LSQ step-gradient scale ``1 / sqrt(numel_full * Qp)``."""
    return 1.0 / math.sqrt(numel_full * lsq_grid(bits, signed)[1])
