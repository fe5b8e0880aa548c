"""``SearchSpace``: the elastic dimensions of a QFA MobileNetV3 supernet, its layer layout, sampling rules and size.

The one description of the search space: the layers (:mod:`qfa.nn`, :mod:`qfa.networks`), the cost model
(:mod:`qfa.cost`), the search encoding and sampling (:mod:`qfa.search`) and the checkpoint loaders read the
layout from here (quantized layers in ``SubnetConfig`` order, block of each layer, stage and position of each
block), so they agree by construction.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import SubnetConfig, int_list

FULL_PRECISION = 32  # a bit-width of 32 means "not quantized" (identity; no quantizer is stored)
HEAD_MIN_BITS = 8  # the classifier is quantized with at least this many bits (spec 3)
N_STAGES = 5  # elastic stages of MobileNetV3
# Quantized conv / linear layers, in ``SubnetConfig.w_bits`` / ``a_bits`` order: block 0 (module
# ``blocks.0.conv``), then every elastic block ``b`` (module ``blocks.<b + 1>.conv``), then the head.
# The stem (``first_conv``) stays in full precision and has no entry.
BLOCK0_QLAYERS = ("depth_conv", "point_linear")
BLOCK_QLAYERS = ("inverted_bottleneck", "depth_conv", "point_linear")  # expand, depthwise, project
HEAD_QLAYERS = ("final_expand_layer", "feature_mix_layer", "classifier")
QLAYERS_PER_BLOCK = len(BLOCK_QLAYERS)
N_FIXED_HEAD = len(BLOCK0_QLAYERS)
N_FIXED_TAIL = len(HEAD_QLAYERS)
DEFAULT_RESOLUTIONS = tuple(range(128, 225, 4))


def _check_options(name: str, values: object, allowed: str, ok) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {values!r}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
            raise ValueError(f"{name}[{i}]={v!r}: must be {allowed}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {tuple(values)}")
    return tuple(sorted(out))


def head_bits(bits: int) -> int:
    """The classifier's bit-width for a drawn ``bits``: raised to at least 8 unless 32 (spec 3)."""
    return bits if bits == FULL_PRECISION else max(bits, HEAD_MIN_BITS)


def classifier_bits(w_bits: Sequence[int], a_bits: Sequence[int]) -> tuple[int, int]:
    """Classifier ``(w, a)`` bits of a searched net whose other layers have these bits (spec 3 rule):
    a quantized net (any layer below 32 bits) gets a W8A8 classifier, an all-32 net keeps it FP."""
    quantized = any(b != FULL_PRECISION for b in (*w_bits, *a_bits))
    return (HEAD_MIN_BITS, HEAD_MIN_BITS) if quantized else (FULL_PRECISION, FULL_PRECISION)


@dataclass(frozen=True)
class SearchSpace:
    """Elastic dimensions of the supernet (defaults: the published QFA MobileNetV3 w1.2 space).

    ``bits_list`` may contain 32 (phase 0 of training); the sampling rules of spec 3 then apply.
    ``p_both_fp`` / ``p_head_both_fp``: the phase-0 probabilities of those rules.
    Derived (not passed): ``n_blocks`` (elastic blocks), ``n_qlayers`` (quantized conv/linear
    layers), ``block_stage`` (stage of each elastic block), ``block_position`` (its index inside its
    stage), ``block_first_qlayer`` (index of its expand layer in ``w_bits`` / ``a_bits``),
    ``qlayer_names`` (module names), ``qlayer_block`` (elastic block of each quantized layer, -1 for
    block 0 and the head).
    """

    ks_list: tuple[int, ...] = (3, 5, 7)
    expand_list: tuple[int, ...] = (3, 4, 6)
    depth_list: tuple[int, ...] = (2, 3, 4)
    bits_list: tuple[int, ...] = (2, 3, 4)
    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    width_mult: float = 1.2
    p_both_fp: float = 0.2
    p_head_both_fp: float = 0.666
    n_stages: int = field(default=N_STAGES, init=False)
    n_blocks: int = field(init=False)
    n_qlayers: int = field(init=False)
    block_stage: tuple[int, ...] = field(init=False)
    block_position: tuple[int, ...] = field(init=False, repr=False)
    block_first_qlayer: tuple[int, ...] = field(init=False, repr=False)
    qlayer_names: tuple[str, ...] = field(init=False, repr=False)
    qlayer_block: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "ks_list", _check_options("ks_list", self.ks_list, "an odd int >= 1", lambda v: v >= 1 and v % 2))
        put(self, "expand_list", _check_options("expand_list", self.expand_list, "an int >= 1", lambda v: v >= 1))
        put(self, "depth_list", _check_options("depth_list", self.depth_list, "an int >= 1", lambda v: v >= 1))
        put(
            self,
            "bits_list",
            _check_options("bits_list", self.bits_list, "in 2..8 or 32", lambda v: 2 <= v <= 8 or v == 32),
        )
        put(self, "resolutions", _check_options("resolutions", self.resolutions, "an int >= 1", lambda v: v >= 1))
        if not isinstance(self.width_mult, (int, float)) or isinstance(self.width_mult, bool) or self.width_mult <= 0:
            raise ValueError(f"width_mult must be a positive number, got {self.width_mult!r}")
        for name in ("p_both_fp", "p_head_both_fp"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        max_d = max(self.depth_list)
        n_blocks = N_STAGES * max_d
        put(self, "n_blocks", n_blocks)
        put(self, "n_qlayers", N_FIXED_HEAD + QLAYERS_PER_BLOCK * n_blocks + N_FIXED_TAIL)
        put(self, "block_stage", tuple(i // max_d for i in range(n_blocks)))
        put(self, "block_position", tuple(i % max_d for i in range(n_blocks)))
        put(self, "block_first_qlayer", tuple(N_FIXED_HEAD + QLAYERS_PER_BLOCK * b for b in range(n_blocks)))
        names = [f"blocks.0.conv.{part}" for part in BLOCK0_QLAYERS]
        owner = [-1] * N_FIXED_HEAD
        for b in range(n_blocks):
            names += [f"blocks.{b + 1}.conv.{part}" for part in BLOCK_QLAYERS]
            owner += [b] * QLAYERS_PER_BLOCK
        names += HEAD_QLAYERS
        owner += [-1] * N_FIXED_TAIL
        put(self, "qlayer_names", tuple(names))
        put(self, "qlayer_block", tuple(owner))

    # ------------------------------------------------------------------ structure

    @property
    def max_depth(self) -> int:
        return max(self.depth_list)

    @property
    def classifier_index(self) -> int:
        """Index of the classifier in ``w_bits`` / ``a_bits`` (the last entry)."""
        return self.n_qlayers - 1

    def stage_blocks(self, stage: int) -> range:
        """Elastic block indices of ``stage``."""
        return range(stage * self.max_depth, (stage + 1) * self.max_depth)

    def active_blocks(self, d: Sequence[int]) -> list[int]:
        """Elastic block indices that run for per-stage depths ``d``."""
        return [b for s, depth in enumerate(d) for b in self.stage_blocks(s)[:depth]]

    def active_block_mask(self, d: np.ndarray) -> np.ndarray:
        """``(n, n_blocks)`` bool for per-stage depths ``d`` ``(n, n_stages)``: block ``b`` runs when its
        position in its stage is below that stage's depth (vectorised :meth:`active_blocks`)."""
        return np.asarray(self.block_position)[None, :] < np.asarray(d)[:, np.asarray(self.block_stage)]

    def num_subnets(self) -> int:
        """Distinct quantized subnets (elastic blocks only: ks, e, and w/a bits of their 3 layers)."""
        per_block = len(self.ks_list) * len(self.expand_list) * len(self.bits_list) ** (2 * QLAYERS_PER_BLOCK)
        per_stage = sum(per_block**d for d in self.depth_list)
        return per_stage**self.n_stages

    # ------------------------------------------------------------------ configs

    def check_config(self, cfg: SubnetConfig) -> None:
        """Raise ``ValueError`` naming the first bad field of ``cfg`` (lengths, option values, head rule)."""
        if not isinstance(cfg, SubnetConfig):
            raise TypeError(f"cfg must be a SubnetConfig, got {type(cfg).__name__}")
        lengths = {
            "ks": (self.n_blocks, "one per elastic block"),
            "e": (self.n_blocks, "one per elastic block"),
            "d": (self.n_stages, "one per stage"),
            "w_bits": (self.n_qlayers, "one per quantized layer"),
            "a_bits": (self.n_qlayers, "one per quantized layer"),
        }
        for name, (n, what) in lengths.items():
            got = len(getattr(cfg, name))
            if got != n:
                raise ValueError(f"{name}: expected {n} values ({what}), got {got}")
        options = {"ks": self.ks_list, "e": self.expand_list, "d": self.depth_list}
        for name, allowed in options.items():
            for i, v in enumerate(getattr(cfg, name)):
                if v not in allowed:
                    raise ValueError(f"{name}[{i}]={v} not in {allowed}")
        bits_allowed = tuple(sorted(set(self.bits_list) | {FULL_PRECISION}))
        head_allowed = tuple(sorted({head_bits(b) for b in bits_allowed}))
        for name in ("w_bits", "a_bits"):
            values = getattr(cfg, name)
            for i, v in enumerate(values[:-1]):
                if v not in bits_allowed:
                    raise ValueError(f"{name}[{i}]={v} not in {bits_allowed} ({self.qlayer_names[i]})")
            v = values[-1]
            if v not in head_allowed:
                raise ValueError(
                    f"{name}[{self.classifier_index}]={v} not in {head_allowed} "
                    f"(the classifier is quantized at >= {HEAD_MIN_BITS} bits, or 32)"
                )
        if cfg.resolution is not None and cfg.resolution < 1:
            raise ValueError(f"resolution={cfg.resolution} must be a positive int (or None)")

    def make_config(
        self,
        ks: int | Sequence[int] | None = None,
        e: int | Sequence[int] | None = None,
        d: int | Sequence[int] | None = None,
        w_bits: int | Sequence[int] | None = None,
        a_bits: int | Sequence[int] | None = None,
        *,
        base: SubnetConfig | None = None,
        resolution: int | None = None,
    ) -> SubnetConfig:
        """A validated config from scalars (all blocks / stages / layers) or full lists; ``None`` keeps
        ``base`` (default: the max subnet, all 32 bits). Scalar or listed classifier bits follow the
        head rule (raised to 8 unless 32)."""
        base = self.full_precision() if base is None else base

        def expand(name: str, value: int | Sequence[int] | None, n: int, default: list[int]) -> list[int]:
            if value is None:
                return list(default)
            if isinstance(value, bool):
                raise TypeError(f"{name} must be an int or a list of ints, got {value!r}")
            if isinstance(value, numbers.Integral):  # also numpy integers
                return [int(value)] * n
            return int_list(name, value)

        cfg = SubnetConfig(
            ks=expand("ks", ks, self.n_blocks, base.ks),
            e=expand("e", e, self.n_blocks, base.e),
            d=expand("d", d, self.n_stages, base.d),
            w_bits=expand("w_bits", w_bits, self.n_qlayers, base.w_bits),
            a_bits=expand("a_bits", a_bits, self.n_qlayers, base.a_bits),
            resolution=resolution,
        )
        for bits in (cfg.w_bits, cfg.a_bits):
            if bits:
                bits[-1] = head_bits(bits[-1])
        self.check_config(cfg)
        return cfg

    def full_precision(self) -> SubnetConfig:
        """The largest subnet with every bit-width 32 (the full-precision teacher)."""
        n = self.n_qlayers
        return SubnetConfig(
            ks=[max(self.ks_list)] * self.n_blocks,
            e=[max(self.expand_list)] * self.n_blocks,
            d=[max(self.depth_list)] * self.n_stages,
            w_bits=[FULL_PRECISION] * n,
            a_bits=[FULL_PRECISION] * n,
        )

    def sample(self, rng: random.Random) -> SubnetConfig:
        """Independent uniform draws: ks and e per block, d per stage, w/a bits per layer (spec 4),
        with the 32-bit rules of spec 3 when 32 is an option. Deterministic given ``rng``'s state."""
        _check_rng(rng)
        ks = [rng.choice(self.ks_list) for _ in range(self.n_blocks)]
        e = [rng.choice(self.expand_list) for _ in range(self.n_blocks)]
        d = [rng.choice(self.depth_list) for _ in range(self.n_stages)]
        w_bits, a_bits = [], []
        for _ in range(self.n_qlayers - 1):
            w, a = self._pair_rule(rng.choice(self.bits_list), rng.choice(self.bits_list), rng)
            w_bits.append(w)
            a_bits.append(a)
        w, a = self._head_rule(head_bits(rng.choice(self.bits_list)), head_bits(rng.choice(self.bits_list)), rng)
        return SubnetConfig(ks, e, d, w_bits + [w], a_bits + [a])

    def sandwich(self, kind: str, rng: random.Random) -> SubnetConfig:
        """``"max"`` (largest e and d) or ``"min"`` (smallest), with one random kernel size for every
        block and one random bit-width for every quantizer (classifier: head rule)."""
        if kind not in ("min", "max"):
            raise ValueError(f'kind must be "min" or "max", got {kind!r}')
        _check_rng(rng)
        pick = max if kind == "max" else min
        ks = rng.choice(self.ks_list)
        bits = rng.choice(self.bits_list)
        n = self.n_qlayers
        w_bits = [bits] * (n - 1) + [head_bits(bits)]
        return SubnetConfig(
            ks=[ks] * self.n_blocks,
            e=[pick(self.expand_list)] * self.n_blocks,
            d=[pick(self.depth_list)] * self.n_stages,
            w_bits=w_bits,
            a_bits=list(w_bits),
        )

    def _pair_rule(self, w: int, a: int, rng: random.Random) -> tuple[int, int]:
        """Phase 0: when exactly one of w/a is 32, both 32 with ``p_both_fp``, else the 32 is redrawn."""
        if w == a or FULL_PRECISION not in (w, a):
            return w, a
        if rng.random() < self.p_both_fp:
            return FULL_PRECISION, FULL_PRECISION
        quantized = [b for b in self.bits_list if b != FULL_PRECISION]
        if w == FULL_PRECISION:
            return rng.choice(quantized), a
        return w, rng.choice(quantized)

    def _head_rule(self, w: int, a: int, rng: random.Random) -> tuple[int, int]:
        """Classifier: when exactly one of w/a is 32, both 32 with ``p_head_both_fp``, else both 8."""
        if w == a:
            return w, a
        if rng.random() < self.p_head_both_fp:
            return FULL_PRECISION, FULL_PRECISION
        return HEAD_MIN_BITS, HEAD_MIN_BITS

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        keys = ("ks_list", "expand_list", "depth_list", "bits_list", "resolutions", "width_mult")
        keys += ("p_both_fp", "p_head_both_fp")
        d = asdict(self)
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in keys}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _check_rng(rng: object) -> None:
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random (seeded identically on every rank), got {type(rng).__name__}")
