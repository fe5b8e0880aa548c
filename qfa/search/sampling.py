"""Subnet sampling for accuracy-predictor data (the published collection mix, spec 6).

Every sample is a uniform draw (``ks``, ``e`` per block, ``d`` per stage, bits per quantized layer,
resolution), then three independent modifiers: full resolution with p=0.4, full depth with p=0.3,
one bit-width for every layer with p=0.3. Sample ``i`` of a run depends only on ``(seed, i)``, so a
resumed or multi-rank collection draws exactly the subnets a single uninterrupted run would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from qfa.config import SubnetConfig
from qfa.search.checks import check_probabilities
from qfa.search.space import space_from_dict
from qfa.space import SearchSpace, classifier_bits


@dataclass(frozen=True)
class SamplingMix:
    """Probabilities of the published modifiers applied on top of a uniform draw."""

    p_full_resolution: float = 0.4
    p_full_depth: float = 0.3
    p_uniform_bits: float = 0.3

    def __post_init__(self) -> None:
        check_probabilities(self, "p_full_resolution", "p_full_depth", "p_uniform_bits")


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of sample ``index`` of a run seeded with ``seed`` (independent of every other sample)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return random.Random(f"qfa-collect:{seed}:{index}")


def sample_config(
    space: SearchSpace | dict[str, Any],
    rng: random.Random,
    mix: SamplingMix | None = None,
    bits_options: tuple[int, ...] | None = None,
) -> SubnetConfig:
    """Draw one :class:`qfa.SubnetConfig` (with a resolution) from ``space``.

    ``bits_options`` restricts the bit-widths (default ``space.bits_list``); the classifier follows
    the spec's W8A8 rule.
    """
    sp = space_from_dict(space) if isinstance(space, dict) else space
    mix = mix or SamplingMix()
    bits = tuple(bits_options) if bits_options is not None else sp.bits_list
    n_layers = sp.n_qlayers - 1  # the classifier is set by the rule
    # Draw every field first, in a fixed order, so a modifier never shifts the other draws.
    ks = [rng.choice(sp.ks_list) for _ in range(sp.n_blocks)]
    e = [rng.choice(sp.expand_list) for _ in range(sp.n_blocks)]
    d = [rng.choice(sp.depth_list) for _ in range(sp.n_stages)]
    w_bits = [rng.choice(bits) for _ in range(n_layers)]
    a_bits = [rng.choice(bits) for _ in range(n_layers)]
    resolution = rng.choice(sp.resolutions)
    full_res = rng.random() < mix.p_full_resolution
    full_depth = rng.random() < mix.p_full_depth
    uniform_bits = rng.random() < mix.p_uniform_bits
    one_bits = rng.choice(bits)
    if full_res:
        resolution = max(sp.resolutions)
    if full_depth:
        d = [sp.max_depth] * sp.n_stages
    if uniform_bits:
        w_bits = [one_bits] * n_layers
        a_bits = [one_bits] * n_layers
    cls_w, cls_a = classifier_bits(w_bits, a_bits)
    return SubnetConfig(ks=ks, e=e, d=d, w_bits=w_bits + [cls_w], a_bits=a_bits + [cls_a], resolution=int(resolution))
