"""Reference of the fused layer epilogue: the composition of today's ops, the oracle of the fused backends.

``F.batch_norm`` (batch statistics, or running statistics when given) -> activation (PyTorch's
``relu`` / ``hardswish``) -> :func:`bquant_kernels.batchquant` on the ``reference`` backend, with
autograd through all three. Run on float64 inputs it is the float64 reference of the chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import batchquant


def activation(a: Tensor, act: str | None) -> Tensor:
    """PyTorch's activation of the supernet layers (``None``: identity)."""
    if act == "relu":
        return F.relu(a)
    if act == "h_swish":
        return F.hardswish(a)
    return a


def bn_act_quant(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    theta: Tensor | None,
    offset: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    lo_hi: Tensor | None,
    eps: float,
    act: str | None,
    bits: int,
    signed: bool,
    want_stats: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(out, stats, range)``: ``stats`` = (2, C) mean and biased variance BN used (when ``want_stats``),
    ``range`` = the ``[lo, hi]`` the quantizer used (when ``bits > 0``)."""
    batch_stats = running_mean is None
    stats = None
    if want_stats:
        if batch_stats:
            dims = [d for d in range(y.dim()) if d != 1]
            var, mean = torch.var_mean(y.detach(), dim=dims, correction=0)
            stats = torch.stack([mean, var])
        else:
            stats = torch.stack([running_mean, running_var])
    z = F.batch_norm(y, running_mean, running_var, weight, bias, batch_stats, 0.0, eps)
    a = activation(z, act)
    if bits == 0:
        return a, stats, None
    out, used = batchquant(a, theta, offset, bits, signed=signed, lo_hi=lo_hi, return_range=True, backend="reference")
    return out, stats, used
