"""Multi-tensor LSQ: fake-quantize many weights at once (spec 2), differentiable in weights and steps.

On the ``cuda`` backend all tensors go through one kernel launch forward and one backward (per 128
tensors), driven by a table of pointers, sizes and bit-widths passed as a kernel parameter; on the
``cpu`` backend it is a C++ loop over the single-tensor kernels. Both are the native op
``torch.ops.bquant.native_lsq_multi`` (csrc/ops.cpp: checks, layout and autograd in C++, one Python
crossing per call, however many tensors). On the other backends it is a loop over
:func:`bquant_kernels.lsq`. The numbers are those of :func:`bquant_kernels.lsq` in every case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import resolve as _resolve_backend
from .ops import _NATIVE, lsq

__all__ = ["lsq_multi"]


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
        differentiable in the weights and the steps. Bad entries raise an error naming their index.
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
    w0 = weights[0]
    if not isinstance(w0, Tensor):
        raise TypeError(f"weights[0] must be a torch.Tensor, got {type(w0).__name__}")
    name = _resolve_backend(backend, w0.device, w0.dtype)
    # The integer arguments are checked here for every backend (the native op checks them again, with
    # the tensors' properties, in C++; a C++ check that throws has crashed one GPU machine: README).
    for i, (w, b, nf) in enumerate(zip(weights, bits, full, strict=True)):
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"bits[{i}] must be in [1, 8], got {b!r}")
        if isinstance(w, Tensor) and (isinstance(nf, bool) or not isinstance(nf, int) or nf < w.numel()):
            raise ValueError(f"numel_full[{i}] must be an int >= weights[{i}].numel() ({w.numel()}), got {nf!r}")
    if name in _NATIVE:
        return list(torch.ops.bquant.native_lsq_multi(weights, steps, bits, bool(signed), full))
    for i, w in enumerate(weights):
        if isinstance(w, Tensor) and (w.device != w0.device or w.dtype != w0.dtype):
            raise ValueError(
                f"weights must share one device and dtype: weights[{i}] is {w.dtype} on {w.device}, "
                f"weights[0] is {w0.dtype} on {w0.device}"
            )
    per_tensor = zip(weights, steps, bits, full, strict=True)
    return [lsq(w, s, b, signed=signed, numel_full=nf, backend=name) for w, s, b, nf in per_tensor]
