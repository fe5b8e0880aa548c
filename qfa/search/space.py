"""The JSON form of a :class:`qfa.SearchSpace` in search files (sample records, predictor metadata).

The layout itself lives in :mod:`qfa.space`; this module only writes and reads it. The JSON form keeps
the derived layout fields (``n_blocks``, ``n_stages``, ``n_qlayers``, ``block_stage``) next to the
options, so a file states the layout it was written for, and reading checks it against the space the
options rebuild. The probabilities of the training sampler are not part of it (the search never draws
with them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qfa.space import SearchSpace

OPTION_KEYS = ("ks_list", "expand_list", "depth_list", "bits_list", "resolutions")
LAYOUT_KEYS = ("n_blocks", "n_stages", "n_qlayers", "block_stage")
# The stored fields, in their order in a file (``width_mult`` follows: a supernet's identity, not the encoding's).
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


def space_to_dict(space: SearchSpace | Mapping[str, Any]) -> dict[str, Any]:
    """``space`` (or a dict of this form, checked) as plain JSON types: the keys of :data:`SPACE_KEYS`
    and ``width_mult``."""
    space = space_from_dict(space) if isinstance(space, Mapping) else space
    if not isinstance(space, SearchSpace):
        raise TypeError(f"space must be a qfa.SearchSpace or its dict form, got {type(space).__name__}")
    out: dict[str, Any] = {}
    for k in SPACE_KEYS:
        v = getattr(space, k)
        out[k] = int(v) if isinstance(v, (int, np.integer)) else [int(x) for x in v]
    out["width_mult"] = float(space.width_mult)
    return out


def space_from_dict(data: Mapping[str, Any]) -> SearchSpace:
    """The :class:`qfa.SearchSpace` of a dict written by :func:`space_to_dict` (``width_mult`` optional);
    ``ValueError`` when a field is missing or the stored layout is not the one its options give."""
    missing = [k for k in SPACE_KEYS if k not in data]
    if missing:
        raise ValueError(f"search space is missing field(s) {missing}")
    kwargs = {k: tuple(int(x) for x in data[k]) for k in OPTION_KEYS}
    if "width_mult" in data:
        kwargs["width_mult"] = float(data["width_mult"])
    space = SearchSpace(**kwargs)
    for k in LAYOUT_KEYS:
        stored = data[k]
        stored = int(stored) if isinstance(stored, (int, np.integer)) else [int(x) for x in stored]
        ours = getattr(space, k)
        if stored != (ours if isinstance(ours, int) else list(ours)):
            raise ValueError(f"space.{k}={stored} does not match the layer layout of its options ({ours})")
    return space
