"""SGD with a no-weight-decay group, and the per-step linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def split_decay_groups(model: nn.Module, no_decay: Iterable[nn.Parameter | str]) -> tuple[list, list]:
    """``(decay, no_decay)`` trainable parameters of ``model``, in registration order.

    ``no_decay`` holds parameters or their names (what ``model.no_decay_parameters()`` gives: BN,
    bias and quantizer parameters).
    """
    named = dict(model.named_parameters())
    ids = set()
    for p in no_decay:
        if isinstance(p, str):
            if p not in named:
                raise ValueError(f"no_decay names {p!r}, which is not a parameter of the model")
            p = named[p]
        ids.add(id(p))
    decay, skip = [], []
    for p in named.values():
        if p.requires_grad:
            (skip if id(p) in ids else decay).append(p)
    return decay, skip


def build_optimizer(
    model: nn.Module,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 3e-5,
    nesterov: bool = True,
    no_decay: Iterable[nn.Parameter | str] | None = None,
) -> torch.optim.SGD:
    """SGD (Nesterov by default) with weight decay on every parameter except ``no_decay``
    (default: ``model.no_decay_parameters()``)."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if no_decay is None:
        no_decay = model.no_decay_parameters()  # type: ignore[operator]
    decay, skip = split_decay_groups(model, no_decay)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": skip, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float = 0.0) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear ramp ``(step + 1) / warmup_steps`` during
    the warmup, then a cosine from 1 to ``final_factor`` over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_factor: float = 0.0
) -> LambdaLR:
    """A per-step :class:`LambdaLR` of :func:`warmup_cosine_factor` (call ``.step()`` after every optimiser step)."""
    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, total_steps > 0; got {warmup_steps}, {total_steps}")
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup_steps, total_steps, final_factor))


def phased_warmup_cosine(optimizer: torch.optim.Optimizer, phases: list[tuple[int, int, float]]) -> LambdaLR:
    """Consecutive phases ``(steps, warmup_steps, scale)``, each its own linear warmup and cosine decay
    (:func:`warmup_cosine_factor`) times ``scale``; a per-step :class:`LambdaLR` (factor 0 after the end).

    One phase ``[(total, warmup, 1.0)]`` is the plain schedule; a warm-start phase in front restarts
    the warmup when the main phase begins (as a new training run from a checkpoint would).
    """
    for steps, warmup, scale in phases:
        if steps <= 0 or not 0 <= warmup <= steps or scale <= 0:
            raise ValueError(f"each phase needs steps > 0, 0 <= warmup_steps <= steps, scale > 0; got {phases}")
    starts = [sum(p[0] for p in phases[:i]) for i in range(len(phases))]

    def factor(step: int) -> float:
        for start, (steps, warmup, scale) in zip(starts, phases, strict=True):
            if step < start + steps:
                return scale * warmup_cosine_factor(step - start, warmup, steps)
        return 0.0

    return LambdaLR(optimizer, factor)
