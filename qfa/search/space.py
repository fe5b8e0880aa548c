"""Search-space helpers shared by sampling, encoding and search (layout facts from docs/qfa-api.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

SPACE_KEYS = (
    "ks_list",
    "expand_list",
    "depth_list",
    "bits_list",
    "n_blocks",
    "n_stages",
    "n_qlayers",
    "resolutions",
    "block_stage",
)
OPTIONAL_KEYS = ("width_mult",)  # part of a supernet's identity, but not of the encoding
# Quantized layers in module order: block 0 (dw, pw), then (expand, dw, project) per elastic block,
# then final expand, feature mix, classifier.
LEADING_QLAYERS = 2
TRAILING_QLAYERS = 3
CLASSIFIER_MIN_BITS = 8  # spec 3: the classifier is raised to at least 8 bits when quantized


def space_to_dict(space: Any) -> dict[str, Any]:
    """The fields of a :class:`qfa.SearchSpace` (or a dict of them) as plain JSON types."""
    if dataclasses.is_dataclass(space) and not isinstance(space, type):
        src = {f.name: getattr(space, f.name) for f in dataclasses.fields(space)}
    elif isinstance(space, dict):
        src = space
    else:
        src = {k: getattr(space, k) for k in (*SPACE_KEYS, *OPTIONAL_KEYS) if hasattr(space, k)}
    missing = [k for k in SPACE_KEYS if k not in src]
    if missing:
        raise ValueError(f"search space is missing field(s) {missing}")
    out: dict[str, Any] = {}
    for k in SPACE_KEYS:
        v = src[k]
        out[k] = int(v) if isinstance(v, (int, np.integer)) else [int(x) for x in v]
    for k in OPTIONAL_KEYS:
        if k in src:
            out[k] = float(src[k])
    expected = LEADING_QLAYERS + 3 * out["n_blocks"] + TRAILING_QLAYERS
    if out["n_qlayers"] != expected:
        raise ValueError(
            f"space.n_qlayers={out['n_qlayers']} does not match the layer layout 2 + 3 * n_blocks + 3 = {expected}"
        )
    if len(out["block_stage"]) != out["n_blocks"]:
        raise ValueError(f"space.block_stage has {len(out['block_stage'])} entries for {out['n_blocks']} blocks")
    return out


def qlayer_blocks(space: Any) -> list[int | None]:
    """Elastic block index of each quantized layer (``None`` for layers outside the elastic blocks)."""
    sp = space_to_dict(space)
    inner = [b for b in range(sp["n_blocks"]) for _ in range(3)]
    return [None] * LEADING_QLAYERS + inner + [None] * TRAILING_QLAYERS


def block_positions(space: Any) -> list[int]:
    """Position of each elastic block inside its stage (0 for the first block of a stage)."""
    sp = space_to_dict(space)
    seen: dict[int, int] = {}
    pos = []
    for s in sp["block_stage"]:
        pos.append(seen.get(s, 0))
        seen[s] = pos[-1] + 1
    return pos


def active_block_mask(depth: np.ndarray, block_stage: np.ndarray, block_position: np.ndarray) -> np.ndarray:
    """``(n, n_blocks)`` bool: block ``b`` runs when its position in its stage is below that stage's depth."""
    return block_position[None, :] < np.asarray(depth)[:, block_stage]


def classifier_bits(w_bits: Sequence[int], a_bits: Sequence[int]) -> tuple[int, int]:
    """Classifier ``(w, a)`` bits for a net whose other layers have these bits (spec 3 rule).

    A quantized net (any layer below 32 bits) gets a W8A8 classifier; an all-32 net keeps it FP.
    """
    quantized = any(b != 32 for b in (*w_bits, *a_bits))
    return (CLASSIFIER_MIN_BITS, CLASSIFIER_MIN_BITS) if quantized else (32, 32)


def config_field(cfg: Any, name: str) -> Any:
    """A field of a SubnetConfig or of its dict form."""
    if isinstance(cfg, dict):
        if name not in cfg:
            raise ValueError(f"config is missing field {name!r}")
        return cfg[name]
    return getattr(cfg, name)
