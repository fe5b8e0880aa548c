"""The pieces of one training step: which subnets train, the distillation teacher, the non-finite check."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import SubnetConfig


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm; names the step and the subnet."""


@dataclass(frozen=True)
class PlannedSubnet:
    """One subnet of a step: ``kind`` is ``"min"``, ``"max"`` or ``"random"``; ``config.resolution`` is set."""

    kind: str
    config: SubnetConfig

    def describe(self) -> str:
        c = self.config
        bits = sorted(set(c.w_bits) | set(c.a_bits))
        shape = f"ks {sorted(set(c.ks))}, e {sorted(set(c.e))}, d {c.d}, bits {bits}"
        return f"{self.kind} subnet at {c.resolution} px ({shape})"


def step_rng(seed: int, step: int) -> random.Random:
    """The subnet-sampling generator of ``step``: a function of ``(seed, step)`` only, hence the same on
    every rank and after a resume."""
    return random.Random(f"qfa-train:{seed}:{step}")


def plan_subnets(model: nn.Module, rng: random.Random, n: int, resolutions: Sequence[int]) -> list[PlannedSubnet]:
    """The ``n`` subnets of a step (spec 5): the min subnet at the smallest resolution, the max subnet at
    the largest, then ``n - 2`` uniformly sampled subnets at random resolutions (``n == 1``: max only).

    Uses the supernet's own sampling rules (``set_sandwich_subnet`` / ``sample_active_subnet``), which
    leave the last planned subnet active.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lo, hi = min(resolutions), max(resolutions)
    plan: list[PlannedSubnet] = []
    kinds = ["max"] if n == 1 else ["min", "max"]
    for kind in kinds:
        cfg = model.set_sandwich_subnet(kind, rng)
        plan.append(PlannedSubnet(kind, dataclasses.replace(cfg, resolution=lo if kind == "min" else hi)))
    for _ in range(n - len(kinds)):
        cfg = model.sample_active_subnet(rng)
        plan.append(PlannedSubnet("random", dataclasses.replace(cfg, resolution=rng.choice(list(resolutions)))))
    return plan


def plan_full_precision(model: nn.Module, resolutions: Sequence[int]) -> list[PlannedSubnet]:
    """The step of the full-precision warm start: the largest network, every bit-width 32, at the
    largest resolution (the first stage of Once-for-All's progressive shrinking)."""
    return [PlannedSubnet("fp-max", dataclasses.replace(model.set_full_precision(), resolution=max(resolutions)))]


@contextlib.contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    for m in drops:
        m.eval()
    try:
        yield
    finally:
        for m in drops:
            m.train()


class InplaceTeacher:
    """In-place distillation: the supernet's own full-precision max subnet, without gradients.

    It runs with BN on batch statistics and dropout off. The spec's teacher is in eval mode, but
    that teacher is a separately trained network with calibrated BN statistics; inside the supernet
    the running statistics are written only by recalibration (never an EMA), so eval mode would
    normalise with stale statistics. Batch statistics are what the full-precision max subnet trains
    with (as in Once-for-All / BigNAS in-place distillation). The caller re-activates the student.
    """

    def __init__(self, supernet: nn.Module) -> None:
        self.supernet = supernet

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        self.supernet.set_full_precision()
        with _dropout_off(self.supernet):
            return self.supernet(images).detach()


class ExternalTeacher:
    """A separate full-precision network (e.g. the Once-for-All max net) in eval mode, without gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.model(images).detach()


class NonFiniteGuard:
    """Checks each step's losses (and gradient norm) for NaN/inf without stalling the device.

    ``push`` starts an asynchronous copy of the step's values to pinned host memory; the values are
    inspected at the next ``push`` (by then the device has long finished that step) or at ``flush``.
    A bad step is therefore reported one step late, but always before a checkpoint is written
    (callers flush first), so no checkpoint ever holds weights updated from a non-finite loss.
    The checked host values also feed the loss logging, so logging costs no extra sync, and so does
    the ranks' stop vote (``stop_vote``: the mean over ranks of their Ctrl-C flags): ``stop_voted``
    turns true at the check of the first step where some rank had asked to stop.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: tuple[int, list[PlannedSubnet], Tensor, object | None] | None = None
        self.history: list[tuple[int, list[float], float]] = []  # (step, per-subnet losses, grad norm)
        self.stop_voted = False

    def push(
        self,
        step: int,
        plan: list[PlannedSubnet],
        losses: Tensor,
        grad_norm: Tensor | None,
        stop_vote: Tensor | None = None,
    ) -> None:
        self.check()
        values = losses.detach().float().reshape(-1)
        norm = grad_norm.detach().float().reshape(1) if grad_norm is not None else values.new_zeros(1)
        vote = stop_vote.detach().float().reshape(1) if stop_vote is not None else values.new_zeros(1)
        packed = torch.cat([values, norm, vote])
        if self.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = packed, None
        self._pending = (step, plan, host, event)

    def check(self) -> None:
        """Inspect the pending step; raise :class:`NonFiniteLossError` if it was bad."""
        if self._pending is None:
            return
        step, plan, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        values = host.tolist()
        losses, norm, vote = values[:-2], values[-2], values[-1]
        for i, (loss, sub) in enumerate(zip(losses, plan, strict=True)):
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss}) at step {step} in subnet {i + 1}/{len(plan)}: {sub.describe()}; "
                    f"config: {sub.config.to_json()}"
                )
        if not math.isfinite(norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm ({norm}) at step {step} (losses {losses}); subnets: "
                + "; ".join(s.describe() for s in plan)
            )
        self.history.append((step, losses, norm))
        self.stop_voted = self.stop_voted or vote > 0

    flush = check

    def drain(self) -> list[tuple[int, list[float], float]]:
        """Checked ``(step, losses, grad_norm)`` records since the last drain."""
        out, self.history = self.history, []
        return out
