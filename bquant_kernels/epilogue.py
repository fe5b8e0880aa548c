"""Fused layer epilogue: BatchNorm -> activation -> BatchQuant of the activated tensor, in one op.

A quantized supernet layer ends with BN (batch statistics in training), an activation, and (where the
next layer's input is exactly that activation) the next layer's BatchQuant. Composed of separate
ops that is about five reads and three writes of the activation each way; fused it is two reads and
one write forward (h_swish: three reads), and the backward recomputes BN and the activation from
``y`` instead of keeping their outputs alive. Backends:

- ``reference``: the composition of today's ops (``bquant_kernels/backends/reference_epilogue.py``),
  the oracle;
- ``cpu``: ``torch.ops.bquant.native_bn_act_quant`` (``csrc/cpu/epilogue_cpu.cpp``), autograd in C++;
- ``triton``: the kernels of ``bquant_kernels/backends/triton/epilogue.py`` under :class:`_TritonEpilogue`.

Requests for the ``cuda`` backend use the composition (no fused CUDA C++ kernel yet).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import extension
from .backends import resolve as _resolve_backend
from .backends.reference_epilogue import bn_act_quant as _reference
from .checks import check_bits, check_param, check_tensor
from .ops import _like, dense_activation
from .qparams import NUM_QPARAMS

ACTIVATIONS = (None, "relu", "h_swish")
_ACT_CODE = {None: 0, "relu": 1, "h_swish": 2}


def _math_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


if extension.ext is not None and hasattr(torch.ops.bquant, "native_bn_act_quant"):

    def _fake_epilogue(y, gamma, beta, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, signed):
        dt = _math_dtype(y)
        return torch.empty_like(y), y.new_empty(2, y.shape[1], dtype=dt), y.new_empty(NUM_QPARAMS, dtype=dt)

    torch.library.register_fake("bquant::native_bn_act_quant", _fake_epilogue)
    torch.library.register_fake("bquant::native_bn_act_quant_fwd", _fake_epilogue)

    @torch.library.register_fake("bquant::native_bn_act_quant_bwd")
    def _(grad_out, y, gamma, beta, stats, offset, qparams, batch_stats, eps, act, bits, signed):
        one = qparams.new_empty(1)
        return torch.empty_like(y), torch.empty_like(gamma), torch.empty_like(beta), one, one.clone()


def fused_backend(backend: str | None, y: Tensor) -> str:
    """The epilogue implementation for ``y``: ``cpu`` where the BatchQuant backend resolves to the
    native CPU kernels, ``triton`` where it resolves to the Triton kernels, else ``reference`` (the
    composition)."""
    name = _resolve_backend(backend, y.device, y.dtype)
    if name == "cpu" and extension.ext is not None and hasattr(torch.ops.bquant, "native_bn_act_quant"):
        return "cpu"
    if name == "triton":
        return "triton"
    return "reference"


class _TritonEpilogue(torch.autograd.Function):
    """The Triton kernels with autograd: saves ``y`` (as the kernels walk it), BN's parameters and the
    per-channel statistics; the backward recomputes BN, the activation and the quantizer mask."""

    @staticmethod
    def forward(ctx, y, weight, bias, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, signed):
        from .backends.triton.epilogue import bn_act_quant_forward, plan

        yl, C, inner = dense_activation(y)
        p = plan(yl, C, inner, eps, act, bits, signed)
        running = None if running_mean is None else torch.stack([running_mean.float(), running_var.float()])
        out, stats, qp, aff = bn_act_quant_forward(yl, weight, bias, theta, offset, running, lo_hi, p)
        ctx.save_for_backward(yl, weight, bias, theta, offset, stats, aff, qp)
        ctx.args = (running_mean is None, p)
        ctx.mark_non_differentiable(stats, qp)
        ctx.set_materialize_grads(False)
        return _like(out, y), stats, qp

    @staticmethod
    def backward(ctx, grad_out, _grad_stats, _grad_qparams):
        from .backends.triton.epilogue import bn_act_quant_backward

        yl, weight, bias, theta, offset, stats, aff, qp = ctx.saved_tensors
        batch_stats, p = ctx.args
        g = torch.zeros_like(yl) if grad_out is None else _like(grad_out, yl)
        gy, gw, gb, gt, go = bn_act_quant_backward(g, yl, weight, bias, stats, aff, offset, qp, batch_stats, p)
        if not p.quant:
            gt = go = None
        else:
            gt, go = gt.reshape(theta.shape).to(theta.dtype), go.reshape(offset.shape).to(offset.dtype)
        return gy, gw, gb, gt, go, None, None, None, None, None, None, None


def _check_channels(name: str, t: object, y: Tensor) -> Tensor:
    t = check_tensor(name, t)
    if t.dim() != 1 or t.shape[0] != y.shape[1]:
        raise ValueError(f"{name} must have shape ({y.shape[1]},) (the channels of y), got {tuple(t.shape)}")
    if t.device != y.device:
        raise ValueError(f"{name} is on {t.device} but y is on {y.device}")
    return t


def bn_act_quant(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    eps: float = 1e-5,
    act: str | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    theta: Tensor | None = None,
    offset: Tensor | None = None,
    bits: int | None = None,
    signed: bool = False,
    lo_hi: Tensor | None = None,
    return_stats: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``batchquant(act(batch_norm(y)))`` in one op: the numbers of the composition, fewer passes.

    Args:
        y: conv output ``(N, C, ...)``, contiguous or channels_last.
        weight, bias: BN's affine parameters, ``(C,)`` (gradients flow to both).
        eps: BN's epsilon.
        act: ``None`` (identity), ``"relu"`` or ``"h_swish"`` (PyTorch's hardswish).
        running_mean, running_var: BN statistics to use (evaluation); ``None``: the batch's (biased
            variance, as ``F.batch_norm`` in training), and then gradients flow through them.
        theta, offset, bits, signed, lo_hi: the BatchQuant quantizer of the activation, as in
            :func:`bquant_kernels.batchquant`; ``bits=None`` stops the chain before it (BN + act only).
        return_stats: also return BN's per-channel ``mean`` and biased ``var`` (the batch's, or the
            running ones given) and the quantizer's ``[lo, hi]`` (``None`` without quantizer), as
            device tensors (recalibration, spec 3).
        backend: as for :func:`bquant_kernels.batchquant`; the ``cpu`` and ``triton`` backends run fused
            kernels, the others the composition (``bquant_kernels.epilogue.fused_backend``).

    Returns:
        ``out`` (shape, dtype and memory format of ``y``), or ``(out, mean, var, lo_hi_used)``.
    """
    check_tensor("y", y, min_dim=2)
    _check_channels("weight", weight, y)
    _check_channels("bias", bias, y)
    if act not in _ACT_CODE:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        _check_channels("running_mean", running_mean, y)
        _check_channels("running_var", running_var, y)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if bits is not None:
        check_bits("bits", bits, 2, 8)
        # One-element parameters of any shape go in as they are (a view would cost an autograd node
        # per call); every backend gives their gradients back in their own shapes.
        check_param("theta", theta, y, "y")
        check_param("offset", offset, y, "y")
        if lo_hi is not None:
            check_param("lo_hi", lo_hi, y, "y", numel=2)
            lo_hi = lo_hi.reshape(2)
    name = fused_backend(backend, y)
    if name == "reference":
        out, stats, used = _reference(
            y, weight, bias, theta, offset, running_mean, running_var, lo_hi, float(eps), act, 0 if bits is None
            else bits, bool(signed), return_stats,
        )  # fmt: skip
    else:
        kernel = torch.ops.bquant.native_bn_act_quant if name == "cpu" else _TritonEpilogue.apply
        out, stats, qp = kernel(
            y, weight, bias, theta, offset, running_mean, running_var, lo_hi, float(eps), _ACT_CODE[act],
            0 if bits is None else bits, bool(signed),
        )  # fmt: skip
        used = None if bits is None or not return_stats else qp[:2]
    if not return_stats:
        return out
    return out, stats[0], stats[1], None if used is None else used.detach()
