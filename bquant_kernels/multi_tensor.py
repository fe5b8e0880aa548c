"""Multi-tensor LSQ: fake-quantize many weights at once (spec 2), differentiable in weights and steps.

On the ``cuda`` backend all tensors go through one kernel launch forward and one backward (per 128
tensors), driven by a table of pointers, sizes and bit-widths passed as a kernel parameter; on every
other backend :func:`lsq_multi` is a loop over :func:`bquant_kernels.lsq`, with the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext
from .backends import resolve as _resolve_backend
from .ops import _check_bits, _check_param, _check_tensor, _like, lsq

__all__ = ["lsq_multi"]


def _dense(t: Tensor) -> Tensor:
    """``t`` itself when the kernels can walk its memory linearly, else a contiguous copy."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _like_weight(out: Tensor, w: Tensor) -> Tensor:
    """``out`` in the memory format the per-tensor op gives for ``w`` (a copy only for non-dense ``w``)."""
    return out if out.stride() == w.stride() else _like(out, torch.empty_like(w))


# numel_full only matters to the backward; it is an input so that autograd's setup_context sees it.
@torch.library.custom_op("bquant::lsq_multi_fwd", mutates_args=())
def _lsq_multi_fwd(
    weights: list[Tensor], steps: list[Tensor], bits: list[int], signed: bool, numel_full: list[int]
) -> list[Tensor]:
    outs = _ext.ext.cuda_lsq_multi_forward([_dense(w) for w in weights], steps, bits, signed)
    return [_like_weight(out, w) for out, w in zip(outs, weights, strict=True)]


@_lsq_multi_fwd.register_fake
def _(weights, steps, bits, signed, numel_full):
    return [torch.empty_like(w) for w in weights]


@torch.library.custom_op("bquant::lsq_multi_bwd", mutates_args=())
def _lsq_multi_bwd(
    grads: list[Tensor],
    weights: list[Tensor],
    steps: list[Tensor],
    bits: list[int],
    signed: bool,
    numel_full: list[int],
) -> tuple[list[Tensor], Tensor]:
    dense = [_dense(w) for w in weights]
    grads = [_like(g, w) for g, w in zip(grads, dense, strict=True)]  # the kernels want grad strides == w strides
    grad_ws, grad_steps = _ext.ext.cuda_lsq_multi_backward(grads, dense, steps, bits, signed, numel_full)
    return [_like_weight(gw, w) for gw, w in zip(grad_ws, weights, strict=True)], grad_steps


@_lsq_multi_bwd.register_fake
def _(grads, weights, steps, bits, signed, numel_full):
    return [torch.empty_like(w) for w in weights], weights[0].new_empty(len(weights), dtype=torch.float32)


def _lsq_multi_setup(ctx, inputs, output) -> None:
    weights, steps, bits, signed, numel_full = inputs
    ctx.save_for_backward(*weights, *steps)
    ctx.args = (len(weights), bits, signed, numel_full)


def _lsq_multi_backward(ctx, grads: list[Tensor]):
    n, bits, signed, numel_full = ctx.args
    saved = ctx.saved_tensors
    weights, steps = list(saved[:n]), list(saved[n:])
    grad_ws, grad_steps = torch.ops.bquant.lsq_multi_bwd(list(grads), weights, steps, bits, signed, numel_full)
    grad_s = [grad_steps[i].reshape(s.shape).to(s.dtype) for i, s in enumerate(steps)]
    return grad_ws, grad_s, None, None, None


_lsq_multi_fwd.register_autograd(_lsq_multi_backward, setup_context=_lsq_multi_setup)


def lsq_multi(
    weights: Sequence[Tensor],
    steps: Sequence[Tensor],
    bits: int | Sequence[int],
    *,
    signed: bool = True,
    numel_full: Sequence[int] | None = None,
    backend: str | None = None,
) -> list[Tensor]:
    """LSQ fake-quantization of every ``weights[i]`` with ``steps[i]`` (spec 2), like
    ``[lsq(w, s, b, signed=signed, numel_full=n) for ...]`` but in one launch each way on the cuda backend.

    Args:
        weights: the weight tensors (one dtype and one device; any shape).
        steps: one 1-element step parameter per weight (``|s|`` is used).
        bits: one bit-width (1..8) for all weights, or one per weight.
        signed: signed LSQ grid (default) or unsigned.
        numel_full: per weight, the element count of the full shared weight it is a slice of (sets the
            step-gradient scale ``1 / sqrt(numel_full * Qp)``); default: each ``weights[i].numel()``.
        backend: as for :func:`bquant_kernels.lsq`; the default is the fastest available.

    Returns:
        The fake-quantized weights, each with the shape, dtype and memory format of its input;
        differentiable in the weights and the steps.
    """
    weights, steps = list(weights), list(steps)
    n = len(weights)
    if len(steps) != n:
        raise ValueError(f"steps must have one entry per weight ({n}), got {len(steps)}")
    bits = [bits] * n if isinstance(bits, int) and not isinstance(bits, bool) else list(bits)
    if len(bits) != n:
        raise ValueError(f"bits must be an int or have one entry per weight ({n}), got {len(bits)}")
    full = [w.numel() for w in weights] if numel_full is None else list(numel_full)
    if len(full) != n:
        raise ValueError(f"numel_full must have one entry per weight ({n}), got {len(full)}")
    if n == 0:
        return []
    for i, (w, s, b, nf) in enumerate(zip(weights, steps, bits, full, strict=True)):
        _check_tensor(f"weights[{i}]", w)
        _check_param(f"steps[{i}]", s, w)
        _check_bits(f"bits[{i}]", b, 1, 8)
        if isinstance(nf, bool) or not isinstance(nf, int) or nf < w.numel():
            raise ValueError(f"numel_full[{i}] must be an int >= weights[{i}].numel() ({w.numel()}), got {nf!r}")
        if w.device != weights[0].device or w.dtype != weights[0].dtype:
            raise ValueError(
                f"weights must share one device and dtype: weights[{i}] is {w.dtype} on {w.device}, "
                f"weights[0] is {weights[0].dtype} on {weights[0].device}"
            )
    name = _resolve_backend(backend, weights[0].device, weights[0].dtype)
    if name != "cuda":
        per_tensor = zip(weights, steps, bits, full, strict=True)
        return [lsq(w, s, b, signed=signed, numel_full=nf, backend=name) for w, s, b, nf in per_tensor]
    return list(torch.ops.bquant.lsq_multi_fwd(weights, steps, bits, bool(signed), full))
