"""Gated BatchQuant: ``batchquant(x * gate)`` in one op, ``gate`` one value per (sample, channel).

A squeeze-excitation block ends with ``x * gate``, and in a quantized supernet that product is exactly
the next conv's BatchQuant input. Composed, the multiply is a pass that writes ``z = x * gate`` (which
the quantizer then reads twice and autograd keeps alive) and a dispatched op each way; fused, ``z`` is
recomputed from ``x`` and ``gate`` where it is needed and never stored. The numbers are those of the
composition (the product rounded to ``x``'s dtype, as ``torch.mul``). The two routes of
``bquant_kernels.ops``:

1. ``cpu``: the native op ``torch.ops.bquant.native_gated_batchquant`` (``csrc/cpu/gated_batchquant_cpu.cpp``),
   autograd in C++.
2. ``reference`` (the composition: the oracle) and ``triton`` (``backends/triton/gated.py``):
   :class:`_GatedBatchQuantFunction` over the backend's ``gated_batchquant_forward`` / ``_backward``,
   through the opaque ops ``torch.ops.bquant.gated_batchquant_fwd`` / ``_bwd`` under ``torch.compile``.

There is no CUDA C++ kernel: on the ``cuda`` backend the op runs the Triton kernels (the reference where
triton is missing), see :func:`gated_backend`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import extension
from .backends import get_backend, kernel_backend
from .checks import check_batchquant_args, check_tensor
from .ops import _as_param, _kernel, _like, _qparams_dtype, dense_activation
from .qparams import NUM_QPARAMS

if extension.has_op("native_gated_batchquant"):

    def _fake_gated(x, gate, theta, offset, lo_hi, bits, signed):
        return torch.empty_like(x), x.new_empty(NUM_QPARAMS, dtype=_qparams_dtype(x))

    torch.library.register_fake("bquant::native_gated_batchquant", _fake_gated)
    torch.library.register_fake("bquant::native_gated_batchquant_fwd", _fake_gated)

    @torch.library.register_fake("bquant::native_gated_batchquant_bwd")
    def _(grad_y, x, gate, offset, qparams, bits, signed):
        one = qparams.new_empty(1)
        return torch.empty_like(x), torch.empty_like(gate), one, one.clone()


def gated_backend(backend: str | None, x: Tensor) -> str:
    """The implementation :func:`gated_batchquant` runs for ``x`` on the BatchQuant ``backend``: ``cpu`` (the
    native op), ``triton`` or ``reference``. The ``cuda`` backend has no kernel of its own for it: Triton's
    where triton runs on ``x``, else the reference."""
    return kernel_backend(backend, x, "native_gated_batchquant")


# ----------------------------------------------------------------------------- route 2


def _gate_matrix(gate: Tensor, x: Tensor) -> Tensor:
    return gate.reshape(x.shape[0], x.shape[1]).contiguous()


def _gated_fwd_impl(
    x: Tensor, gate: Tensor, theta: Tensor, offset: Tensor, lo_hi: Tensor | None, bits: int, signed: bool, backend: str
) -> tuple[Tensor, Tensor]:
    xl, C, inner = dense_activation(x)
    y, qp = get_backend(backend).gated_batchquant_forward(
        xl, _gate_matrix(gate, x), theta, offset, lo_hi, bits, signed, C, inner
    )
    return _like(y, x), qp


def _gated_bwd_impl(
    grad_y: Tensor, x: Tensor, gate: Tensor, offset: Tensor, qparams: Tensor, bits: int, signed: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xl, C, inner = dense_activation(x)
    gx, gg, gt, go = get_backend(backend).gated_batchquant_backward(
        _like(grad_y, xl), xl, _gate_matrix(gate, x), offset, qparams, bits, signed, C, inner
    )
    return _like(gx, x), gg.reshape(gate.shape), gt, go


_gated_fwd_op = torch.library.custom_op("bquant::gated_batchquant_fwd", _gated_fwd_impl, mutates_args=())
_gated_bwd_op = torch.library.custom_op("bquant::gated_batchquant_bwd", _gated_bwd_impl, mutates_args=())


@_gated_fwd_op.register_fake
def _(x, gate, theta, offset, lo_hi, bits, signed, backend):
    return torch.empty_like(x), x.new_empty(NUM_QPARAMS, dtype=_qparams_dtype(x))


@_gated_bwd_op.register_fake
def _(grad_y, x, gate, offset, qparams, bits, signed, backend):
    one = qparams.new_empty(1)
    return torch.empty_like(x), torch.empty_like(gate), one, one.clone()


class _GatedBatchQuantFunction(torch.autograd.Function):
    """Gated BatchQuant of the Python backends. Saves ``x``, ``gate``, ``offset`` and the qparams (not the
    product ``z``); the backward recomputes ``z`` and the quantizer's mask."""

    @staticmethod
    def forward(ctx, x, gate, theta, offset, lo_hi, bits, signed, backend):
        forward = _kernel(_gated_fwd_impl, torch.ops.bquant.gated_batchquant_fwd)
        y, qp = forward(x, gate, theta, offset, lo_hi, bits, signed, backend)
        ctx.save_for_backward(x, gate, theta, offset, qp)
        ctx.args = (bits, signed, backend)
        ctx.mark_non_differentiable(qp)
        ctx.set_materialize_grads(False)
        return y, qp

    @staticmethod
    def backward(ctx, grad_y, _grad_qparams):
        x, gate, theta, offset, qp = ctx.saved_tensors
        bits, signed, backend = ctx.args
        if grad_y is None:  # only the range was used
            grad_y = torch.zeros_like(x)
        backward = _kernel(_gated_bwd_impl, torch.ops.bquant.gated_batchquant_bwd)
        gx, gg, gt, go = backward(grad_y, x, gate, offset, qp, bits, signed, backend)
        return gx, gg, _as_param(gt, theta), _as_param(go, offset), None, None, None, None


# ----------------------------------------------------------------------------- public API


def _check_gate(gate: object, x: Tensor) -> Tensor:
    g = check_tensor("gate", gate)
    N, C = x.shape[:2]
    if tuple(g.shape) not in ((N, C), (N, C) + (1,) * (x.dim() - 2)):
        raise ValueError(
            f"gate must have shape ({N}, {C}) or ({N}, {C}{', 1' * (x.dim() - 2)}) (one value per sample and "
            f"channel of x), got {tuple(g.shape)}"
        )
    if g.dtype != x.dtype:
        raise TypeError(f"gate must have the dtype of x ({x.dtype}), got {g.dtype}")
    if g.device != x.device:
        raise ValueError(f"gate is on {g.device} but x is on {x.device}")
    return g


def gated_batchquant(
    x: Tensor,
    gate: Tensor,
    theta: Tensor,
    offset: Tensor,
    bits: int,
    *,
    signed: bool = False,
    lo_hi: Tensor | None = None,
    return_range: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``batchquant(x * gate)`` in one op: a squeeze-excitation output quantized for the next layer.

    Args:
        x: ``(N, C, ...)`` activations, contiguous or channels_last.
        gate: one multiplier per sample and channel, ``(N, C)`` or ``(N, C, 1, ..., 1)``, ``x``'s dtype and
            device. Gradients flow to it (in its shape) and to ``x``.
        theta, offset, bits, signed, lo_hi, return_range, backend: as for
            :func:`bquant_kernels.batchquant`, whose numbers this gives for the product ``x * gate``
            (rounded to ``x``'s dtype). ``cpu`` and ``triton`` run fused kernels, ``reference`` the
            composition, ``cuda`` Triton's kernels (:func:`gated_backend`).

    Returns:
        ``y`` (shape, dtype and memory format of ``x``), or ``(y, lo_hi_used)``.
    """
    check_tensor("x", x, min_dim=2)
    gate = _check_gate(gate, x)
    lo_hi = check_batchquant_args(x, theta, offset, bits, lo_hi)
    name = gated_backend(backend, x)
    if name == "cpu":
        y, qp = torch.ops.bquant.native_gated_batchquant(x, gate, theta, offset, lo_hi, bits, bool(signed))
    else:
        y, qp = _GatedBatchQuantFunction.apply(x, gate, theta, offset, lo_hi, bits, bool(signed), name)
    return (y, qp[:2].detach()) if return_range else y
