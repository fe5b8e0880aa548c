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

from .backends import NATIVE, resolve
from .checks import check_lsq_multi
from .ops import lsq_checked

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
    if numel_full is not None and len(numel_full) != n:
        raise ValueError(f"numel_full must have one entry per weight ({n}), got {len(numel_full)}")
    if n == 0:
        return []
    full = check_lsq_multi(weights, steps, bits, numel_full)  # every entry, before any kernel runs
    name = resolve(backend, weights[0].device, weights[0].dtype)
    if name in NATIVE:
        return list(torch.ops.bquant.native_lsq_multi(weights, steps, bits, bool(signed), full))
    per_tensor = zip(weights, steps, bits, full, strict=True)
    return [lsq_checked(w, s, b, bool(signed), nf, name) for w, s, b, nf in per_tensor]
