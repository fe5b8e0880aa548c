"""Small helpers shared by the layers and the architecture description."""

from __future__ import annotations

from torch import Tensor, nn

# Activation names used by the architecture tables; h_swish / h_sigmoid are PyTorch's hard variants
# (x * relu6(x + 3) / 6 and relu6(x + 3) / 6, as in MobileNetV3).
ACTIVATIONS = ("relu", "h_swish", None)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``v`` rounded to the nearest multiple of ``divisor``, never below 90% of ``v`` (MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def build_activation(name: str | None) -> nn.Module:
    """The activation module for a name of :data:`ACTIVATIONS`."""
    if name == "relu":
        return nn.ReLU()
    if name == "h_swish":
        return nn.Hardswish()
    if name is None:
        return nn.Identity()
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {name!r}")


def sub_kernel_slice(max_ks: int, ks: int) -> slice:
    """Centre ``ks`` x ``ks`` window of a ``max_ks`` x ``max_ks`` kernel, along one axis."""
    start = (max_ks - ks) // 2
    return slice(start, start + ks)


def leading(t: Tensor, *sizes: int) -> Tensor:
    """``t[:sizes[0], :sizes[1], ...]``, or ``t`` itself when that cuts nothing: a slice view costs an
    autograd node whose backward zero-fills and copies a gradient of ``t``'s full size."""
    if all(n == t.shape[d] for d, n in enumerate(sizes)):
        return t
    return t[tuple(slice(n) for n in sizes)]
