"""Fused layer epilogue: BatchNorm -> activation -> BatchQuant of the activated tensor, in one op.

A quantized supernet layer ends with BN (batch statistics in training), an activation, and (where the
next layer's input is exactly that activation) the next layer's BatchQuant. Composed of separate
ops that is about five reads and three writes of the activation each way; fused it is two reads and
one write forward (h_swish: three reads), and the backward recomputes BN and the activation from
``y`` instead of keeping their outputs alive. The two routes of ``bquant_kernels.ops``:

1. ``cpu``: the native op ``torch.ops.bquant.native_bn_act_quant`` (``csrc/cpu/epilogue_cpu.cpp``),
   autograd in C++.
2. ``reference`` (the composition of today's ops, the oracle) and ``triton``
   (``backends/triton/epilogue.py``): :class:`_EpilogueFunction` over the backend's
   ``bn_act_quant_forward`` / ``bn_act_quant_backward``, through the opaque ops
   ``torch.ops.bquant.bn_act_quant_fwd`` / ``_bwd`` under ``torch.compile``.

There is no CUDA C++ kernel: on the ``cuda`` backend the op runs the Triton kernels (the reference
where triton is missing); see :func:`fused_backend`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import extension
from .backends import get_backend, kernel_backend
from .checks import check_bits, check_param, check_tensor
from .ops import _as_param, _kernel, _like, dense_activation
from .qparams import NUM_QPARAMS

ACTIVATIONS = (None, "relu", "h_swish")
_ACT_CODE = {None: 0, "relu": 1, "h_swish": 2}


def _math_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


if extension.has_op("native_bn_act_quant"):

    def _fake_epilogue(
        y, gamma, beta, residual, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, signed, keep
    ):
        dt = _math_dtype(y)
        kept = torch.empty_like(y) if keep else y.new_empty(0)
        return torch.empty_like(y), kept, y.new_empty(2, y.shape[1], dtype=dt), y.new_empty(NUM_QPARAMS, dtype=dt)

    torch.library.register_fake("bquant::native_bn_act_quant", _fake_epilogue)
    torch.library.register_fake("bquant::native_bn_act_quant_fwd", _fake_epilogue)

    @torch.library.register_fake("bquant::native_bn_act_quant_bwd")
    def _(grad_out, grad_act, y, residual, gamma, beta, stats, offset, qparams, batch_stats, eps, act, bits, signed):
        one = qparams.new_empty(1)
        grad_residual = y.new_empty(0) if residual is None else torch.empty_like(residual)
        return torch.empty_like(y), grad_residual, torch.empty_like(gamma), torch.empty_like(beta), one, one.clone()


def fused_backend(backend: str | None, y: Tensor) -> str:
    """The implementation the op runs for ``y`` on the BatchQuant ``backend``: ``cpu`` (the native op),
    ``triton``, or ``reference``. The ``cuda`` backend has no epilogue kernel of its own: Triton's where
    triton runs on ``y``, else the reference."""
    return kernel_backend(backend, y, "native_bn_act_quant")


# ----------------------------------------------------------------------------- route 2


def _epilogue_fwd_impl(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    yl, C, inner = dense_activation(y)
    rl = None if residual is None else _like(residual, yl)
    out, kept, stats, qp, aux = get_backend(backend).bn_act_quant_forward(
        yl, gamma, beta, rl, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, signed, keep, C, inner
    )
    return _like(out, y), _like(kept, y) if keep else kept, stats, qp, aux


def _epilogue_bwd_impl(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    yl, C, inner = dense_activation(y)
    rl = None if residual is None else _like(residual, yl)
    gal = None if grad_act is None else _like(grad_act, yl)
    gy, gr, gg, gb, gt, go = get_backend(backend).bn_act_quant_backward(
        _like(grad_out, yl), gal, yl, rl, gamma, beta, stats, aux, offset, qparams, batch_stats, eps, act, bits,
        signed, C, inner,
    )  # fmt: skip
    if residual is not None:
        gr = _like(gr, y)
        if gr is grad_out:  # bits == 0: grad_out itself, which a custom op may not return
            gr = gr.clone()
    return _like(gy, y), gr, gg, gb, gt, go


_epilogue_fwd_op = torch.library.custom_op("bquant::bn_act_quant_fwd", _epilogue_fwd_impl, mutates_args=())
_epilogue_bwd_op = torch.library.custom_op("bquant::bn_act_quant_bwd", _epilogue_bwd_impl, mutates_args=())


@_epilogue_fwd_op.register_fake
def _(y, gamma, beta, residual, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, signed, keep, backend):
    dt, C = _math_dtype(y), y.shape[1]
    kept = torch.empty_like(y) if keep else y.new_empty(0)
    aux = y.new_empty((3, C) if backend == "triton" else (0,), dtype=dt)  # triton: the per-channel affine
    return torch.empty_like(y), kept, y.new_empty(2, C, dtype=dt), y.new_empty(NUM_QPARAMS, dtype=dt), aux


@_epilogue_bwd_op.register_fake
def _(grad_out, grad_act, y, residual, gamma, beta, stats, aux, offset, qparams, batch_stats, eps, act, bits, signed,
      backend):  # fmt: skip
    one = qparams.new_empty(1)
    grad_residual = y.new_empty(0) if residual is None else torch.empty_like(y)
    return torch.empty_like(y), grad_residual, torch.empty_like(gamma), torch.empty_like(beta), one, one.clone()


class _EpilogueFunction(torch.autograd.Function):
    """The epilogue of the Python backends. Saves ``y``, the residual, BN's parameters, the statistics and
    the backend's ``aux`` (not the sum ``s``); the backward recomputes BN, the activation, ``s`` and the
    quantizer mask from ``y`` and the residual. Two differentiable outputs: ``out`` and ``kept`` (``s``,
    empty without ``keep``)."""

    @staticmethod
    def forward(
        ctx, y, gamma, beta, residual, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, signed, keep,
        backend,
    ):  # fmt: skip
        forward = _kernel(_epilogue_fwd_impl, torch.ops.bquant.bn_act_quant_fwd)
        out, kept, stats, qp, aux = forward(
            y, gamma, beta, residual, theta, offset, running_mean, running_var, lo_hi, eps, act, bits, signed, keep,
            backend,
        )  # fmt: skip
        ctx.save_for_backward(y, residual, gamma, beta, theta, offset, stats, aux, qp)
        ctx.args = (running_mean is None, eps, act, bits, signed, backend)
        ctx.mark_non_differentiable(stats, qp)
        ctx.set_materialize_grads(False)  # no zeros for an unused kept (grad_act None) or a missing grad_out
        return out, kept, stats, qp

    @staticmethod
    def backward(ctx, grad_out, grad_act, _grad_stats, _grad_qparams):
        y, residual, gamma, beta, theta, offset, stats, aux, qp = ctx.saved_tensors
        batch_stats, eps, act, bits, signed, backend = ctx.args
        grad_out = torch.zeros_like(y) if grad_out is None else grad_out
        if grad_act is not None and grad_act.numel() == 0:  # the empty kept of keep=False
            grad_act = None
        backward = _kernel(_epilogue_bwd_impl, torch.ops.bquant.bn_act_quant_bwd)
        gy, gr, gg, gb, gt, go = backward(
            grad_out, grad_act, y, residual, gamma, beta, stats, aux, offset, qp, batch_stats, eps, act, bits, signed,
            backend,
        )  # fmt: skip
        gr = None if residual is None else gr
        if bits == 0:
            gt = go = None
        else:
            gt, go = _as_param(gt, theta), _as_param(go, offset)
        return gy, gg, gb, gr, gt, go, None, None, None, None, None, None, None, None, None


def _check_channels(name: str, t: object, y: Tensor) -> Tensor:
    t = check_tensor(name, t)
    if t.dim() != 1 or t.shape[0] != y.shape[1]:
        raise ValueError(f"{name} must have shape ({y.shape[1]},) (the channels of y), got {tuple(t.shape)}")
    if t.device != y.device:
        raise ValueError(f"{name} is on {t.device} but y is on {y.device}")
    return t


def _check_residual(residual: object, y: Tensor) -> Tensor:
    """``residual`` with ``y``'s shape, dtype, device and strides (the kernels walk both alike): a copy
    in ``y``'s layout where its strides differ (autograd flows through the copy)."""
    r = check_tensor("residual", residual)
    if r.shape != y.shape:
        raise ValueError(f"residual must have the shape of y {tuple(y.shape)}, got {tuple(r.shape)}")
    if r.dtype != y.dtype:
        raise TypeError(f"residual must have the dtype of y ({y.dtype}), got {r.dtype}")
    if r.device != y.device:
        raise ValueError(f"residual is on {r.device} but y is on {y.device}")
    return _like(r, y)


def bn_act_quant(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    eps: float = 1e-5,
    act: str | None = None,
    residual: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    theta: Tensor | None = None,
    offset: Tensor | None = None,
    bits: int | None = None,
    signed: bool = False,
    lo_hi: Tensor | None = None,
    return_activation: bool = False,
    return_stats: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """``batchquant(act(batch_norm(y)) + residual)`` in one op: the numbers of the composition, fewer passes.

    Args:
        y: conv output ``(N, C, ...)``, contiguous or channels_last.
        weight, bias: BN's affine parameters, ``(C,)`` (gradients flow to both).
        eps: BN's epsilon.
        act: ``None`` (identity), ``"relu"`` or ``"h_swish"`` (PyTorch's hardswish).
        residual: added after the activation (an inverted-residual block's shortcut), shape and dtype
            of ``y``; ``None``: nothing added. Gradients flow to it.
        running_mean, running_var: BN statistics to use (evaluation); ``None``: the batch's (biased
            variance, as ``F.batch_norm`` in training), and then gradients flow through them.
        theta, offset, bits, signed, lo_hi: the BatchQuant quantizer of ``act(bn(y)) + residual``, as
            in :func:`bquant_kernels.batchquant`; ``bits=None`` stops the chain before it.
        return_activation: also return the quantizer's input ``act(bn(y)) + residual`` (for a later
            shortcut; needs ``bits``); gradients flowing into it add to those through the quantizer.
        return_stats: also return BN's per-channel ``mean`` and biased ``var`` (the batch's, or the
            running ones given) and the quantizer's ``[lo, hi]`` (``None`` without quantizer), as
            device tensors (recalibration, spec 3).
        backend: as for :func:`bquant_kernels.batchquant`: ``cpu`` and ``triton`` run fused kernels,
            ``reference`` the composition of the separate ops, ``cuda`` Triton's kernels
            (:func:`fused_backend`).

    Returns:
        ``out`` (shape, dtype and memory format of ``y``); with ``return_activation`` ``(out, activation)``;
        with ``return_stats`` these followed by ``mean, var, lo_hi_used``.
    """
    check_tensor("y", y, min_dim=2)
    _check_channels("weight", weight, y)
    _check_channels("bias", bias, y)
    if act not in _ACT_CODE:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if residual is not None:
        residual = _check_residual(residual, y)
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
    elif return_activation:
        raise ValueError("return_activation needs a quantizer (bits): without one the output is the activation")
    name = fused_backend(backend, y)
    args = (y, weight, bias, residual, theta, offset, running_mean, running_var, lo_hi, float(eps), _ACT_CODE[act])
    flags = (0 if bits is None else bits, bool(signed), bool(return_activation))
    if name == "cpu":
        out, kept, stats, qp = torch.ops.bquant.native_bn_act_quant(*args, *flags)
    else:
        out, kept, stats, qp = _EpilogueFunction.apply(*args, *flags, name)
    result = (out, kept) if return_activation else (out,)
    if return_stats:
        result += (stats[0], stats[1], None if bits is None else qp[:2].detach())
    return result[0] if len(result) == 1 else result
