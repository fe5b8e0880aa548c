"""Subnet encodings for the accuracy predictor and the search.

Two views of a subnet, both derived from a :class:`qfa.SearchSpace`:

- *choice indices*: one integer per decision (``ks`` and ``e`` per block, ``d`` per stage, the
  resolution, ``w`` and ``a`` bits per searchable quantized layer), each an index into its option
  list. This is the NSGA-II genome and the compact form the one-hot features are built from.
- *features*: the published one-hot encoding (spec 6): ``ks`` and ``e`` one-hot per block, a depth
  thermometer per stage, the resolution one-hot, ``w`` and ``a`` bits one-hot per quantized layer.

Blocks that the depth leaves inactive (and their quantized layers) encode as all zeros, so subnets
that compute the same function get the same features. The classifier's bits are not a decision (the
spec fixes them at 8 whenever the net is quantized), so they have no feature and no gene.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qfa.config import SubnetConfig
from qfa.search.space import space_from_dict, space_to_dict
from qfa.space import FULL_PRECISION, HEAD_MIN_BITS, SearchSpace, classifier_bits


@dataclass(frozen=True)
class _Segment:
    """A run of genes sharing one option list (``ks`` of every block, ``w`` bits of every layer, ...)."""

    name: str
    options: tuple[int, ...]
    count: int
    start: int  # first gene index

    @property
    def stop(self) -> int:
        return self.start + self.count


class SubnetEncoder:
    """Maps subnet configs to choice indices and one-hot features, for one search space.

    Args:
        space: the supernet's :class:`qfa.SearchSpace` (or the dict of :func:`qfa.search.space.space_to_dict`).
        bits_options: bit-widths the quantized layers may take (default ``space.bits_list``).
    """

    def __init__(self, space: SearchSpace | dict[str, Any], bits_options: Sequence[int] | None = None) -> None:
        # Through the JSON form: what identifies an encoding (the training sampler's probabilities do not).
        self.space = sp = space_from_dict(space_to_dict(space))
        chosen = sp.bits_list if bits_options is None else list(bits_options)
        if not chosen:
            raise ValueError("bits_options must not be empty")
        bad = [b for b in chosen if b not in sp.bits_list]
        if bad:
            raise ValueError(f"bit-width(s) {bad} not in this supernet's bits_list {sp.bits_list}")
        self.bits_options = tuple(sorted({int(b) for b in chosen}))  # ascending: gene 0 is the cheapest
        self.n_blocks, self.n_stages, self.n_qlayers = sp.n_blocks, sp.n_stages, sp.n_qlayers
        self.n_searched_qlayers = self.n_qlayers - 1  # every quantized layer but the classifier
        segments: list[_Segment] = []
        start = 0
        for name, options, count in (
            ("ks", sp.ks_list, self.n_blocks),
            ("e", sp.expand_list, self.n_blocks),
            ("d", sp.depth_list, self.n_stages),
            ("resolution", sp.resolutions, 1),
            ("w_bits", self.bits_options, self.n_searched_qlayers),
            ("a_bits", self.bits_options, self.n_searched_qlayers),
        ):
            segments.append(_Segment(name, tuple(int(o) for o in options), count, start))
            start += count
        self.segments = {s.name: s for s in segments}
        self.n_genes = start
        # Upper bound (inclusive) of every gene, for the optimiser.
        self.gene_upper = np.concatenate([np.full(s.count, len(s.options) - 1) for s in segments]).astype(np.int64)
        self.n_features = sum(units * width for _, units, width in self.feature_groups())

    # ------------------------------------------------------------------ metadata

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description; :meth:`from_metadata` rebuilds an identical encoder."""
        return {
            "space": space_to_dict(self.space),
            "bits_options": list(self.bits_options),
            "n_features": self.n_features,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> SubnetEncoder:
        enc = cls(meta["space"], meta["bits_options"])
        if enc.n_features != meta["n_features"]:
            raise ValueError(
                f"encoding metadata says {meta['n_features']} features, rebuilt encoder has {enc.n_features}"
            )
        return enc

    def check_space(self, space: SearchSpace | dict[str, Any], what: str = "supernet") -> None:
        """Raise a ValueError naming the first field where ``space`` differs from this encoder's space."""
        other = space_to_dict(space)
        for key, value in space_to_dict(self.space).items():
            if other.get(key) != value:
                raise ValueError(
                    f"the {what} search space differs from the one this encoding was built for: "
                    f"{key}={other.get(key)!r}, expected {value!r}"
                )

    # ------------------------------------------------------------------ configs <-> indices

    def to_indices(self, cfg: Any) -> np.ndarray:
        """Choice indices of one config (a SubnetConfig or its dict); ValueError names a bad field."""
        genes = np.empty(self.n_genes, dtype=np.int64)
        for seg in self.segments.values():
            if seg.name == "resolution":
                res = _config_field(cfg, "resolution")
                if res is None:
                    raise ValueError("config has no resolution (resolution=None); the predictor needs one")
                values: Sequence[int] = [res]
            else:
                values = list(_config_field(cfg, seg.name))
                expected = self.n_qlayers if seg.name.endswith("_bits") else seg.count
                if len(values) != expected:
                    raise ValueError(f"{seg.name} has {len(values)} entries, this search space needs {expected}")
                values = values[: seg.count]  # drops the classifier for the bits fields
            lookup = {o: i for i, o in enumerate(seg.options)}
            for j, v in enumerate(values):
                if v not in lookup:
                    label = seg.name if seg.name == "resolution" else f"{seg.name}[{j}]"
                    raise ValueError(f"{label}={v} not in {seg.options}")
                genes[seg.start + j] = lookup[v]
        return genes

    def to_index_matrix(self, cfgs: Iterable[Any]) -> np.ndarray:
        rows = [self.to_indices(c) for c in cfgs]
        return np.stack(rows) if rows else np.zeros((0, self.n_genes), dtype=np.int64)

    def from_indices(self, genes: np.ndarray) -> Any:
        """The SubnetConfig of one row of choice indices (classifier bits per the spec rule)."""
        genes = np.asarray(genes)
        if genes.shape != (self.n_genes,):
            raise ValueError(f"genes must have shape ({self.n_genes},), got {genes.shape}")
        out: dict[str, Any] = {}
        for seg in self.segments.values():
            idx = genes[seg.start : seg.stop]
            if np.any(idx < 0) or np.any(idx >= len(seg.options)):
                raise ValueError(f"{seg.name} gene out of range [0, {len(seg.options) - 1}]: {idx.tolist()}")
            out[seg.name] = [seg.options[i] for i in idx.tolist()]
        w, a = out["w_bits"], out["a_bits"]
        cls_w, cls_a = classifier_bits(w, a)
        return SubnetConfig(
            ks=out["ks"],
            e=out["e"],
            d=out["d"],
            w_bits=w + [cls_w],
            a_bits=a + [cls_a],
            resolution=out["resolution"][0],
        )

    def to_arrays(self, genes: np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised decode of a ``(n, n_genes)`` matrix into value arrays (``ks``, ``e``, ``d``,
        ``w_bits`` and ``a_bits`` with the classifier column, ``resolution``): the input of
        :meth:`qfa.cost.CostModel.evaluate_batch`."""
        genes = np.asarray(genes, dtype=np.int64)
        out = {}
        for name, seg in self.segments.items():
            out[name] = np.asarray(seg.options, dtype=np.int64)[genes[:, seg.start : seg.stop]]
        out["resolution"] = out["resolution"][:, 0]
        quantized = np.any(out["w_bits"] != FULL_PRECISION, axis=1) | np.any(out["a_bits"] != FULL_PRECISION, axis=1)
        head = np.where(quantized, HEAD_MIN_BITS, FULL_PRECISION)[:, None]  # classifier_bits, vectorised
        out["w_bits"] = np.concatenate([out["w_bits"], head], axis=1)
        out["a_bits"] = np.concatenate([out["a_bits"], head], axis=1)
        return out

    # ------------------------------------------------------------------ features

    def _activity(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Depth values ``(n, n_stages)``, active blocks ``(n, n_blocks)``, active searched layers."""
        seg = self.segments["d"]
        depth = np.asarray(seg.options)[genes[:, seg.start : seg.stop]]
        block_on = self.space.active_block_mask(depth)
        layer_on = np.ones((len(genes), self.n_searched_qlayers), dtype=bool)
        for j, b in enumerate(self.space.qlayer_block[: self.n_searched_qlayers]):
            if b >= 0:
                layer_on[:, j] = block_on[:, b]
        return depth, block_on, layer_on

    def canonical(self, genes: np.ndarray) -> np.ndarray:
        """Genes with the choices of inactive blocks set to index 0: equal rows compute the same function."""
        genes = np.array(genes, dtype=np.int64, copy=True)
        _, block_on, layer_on = self._activity(genes)
        for name, on in (("ks", block_on), ("e", block_on), ("w_bits", layer_on), ("a_bits", layer_on)):
            seg = self.segments[name]
            genes[:, seg.start : seg.stop][~on] = 0
        return genes

    def features(self, genes: np.ndarray) -> np.ndarray:
        """float32 one-hot features of a ``(n, n_genes)`` index matrix (vectorised, no Python loop over rows)."""
        genes = np.asarray(genes, dtype=np.int64)
        if genes.ndim != 2 or genes.shape[1] != self.n_genes:
            raise ValueError(f"genes must have shape (n, {self.n_genes}), got {genes.shape}")
        n = genes.shape[0]
        seg = self.segments
        depth_options = np.asarray(seg["d"].options)
        depth, block_on, layer_on = self._activity(genes)
        parts = [
            _one_hot(genes[:, seg["ks"].start : seg["ks"].stop], len(seg["ks"].options), block_on),
            _one_hot(genes[:, seg["e"].start : seg["e"].stop], len(seg["e"].options), block_on),
            # Thermometer: one bit per depth option above the smallest (that one is always reached).
            (depth[:, :, None] >= depth_options[None, None, 1:]).reshape(n, -1),
            _one_hot(genes[:, seg["resolution"].start : seg["resolution"].stop], len(seg["resolution"].options)),
            _one_hot(genes[:, seg["w_bits"].start : seg["w_bits"].stop], len(self.bits_options), layer_on),
            _one_hot(genes[:, seg["a_bits"].start : seg["a_bits"].stop], len(self.bits_options), layer_on),
        ]
        out = np.concatenate([p.reshape(n, -1).astype(np.float32) for p in parts], axis=1)
        assert out.shape[1] == self.n_features
        return out

    def encode(self, cfgs: Iterable[Any]) -> np.ndarray:
        """float32 ``(n, n_features)`` features of configs (SubnetConfig objects or dicts)."""
        return self.features(self.to_index_matrix(cfgs))

    def feature_groups(self) -> list[tuple[str, int, int]]:
        """``(name, units, width)`` of each block of :meth:`features`, in order: ``units`` one-hot (or
        thermometer) vectors of ``width`` entries each."""
        sp = self.space
        return [
            ("ks", self.n_blocks, len(sp.ks_list)),
            ("e", self.n_blocks, len(sp.expand_list)),
            ("d", self.n_stages, len(sp.depth_list) - 1),
            ("resolution", 1, len(sp.resolutions)),
            ("w_bits", self.n_searched_qlayers, len(self.bits_options)),
            ("a_bits", self.n_searched_qlayers, len(self.bits_options)),
        ]

    def group_scales(self) -> np.ndarray:
        """float32 per-feature factor ``1 / sqrt(units)`` of its group: every decision type (kernel sizes,
        expand ratios, depths, resolution, weight bits, activation bits) then contributes the same
        input energy, instead of the 64 bit-width units outweighing the one resolution unit 64:1."""
        return np.concatenate(
            [
                np.full(units * width, 1.0 / math.sqrt(units), dtype=np.float32)
                for _, units, width in self.feature_groups()
            ]
        )


def _config_field(cfg: SubnetConfig | dict[str, Any], name: str) -> Any:
    """A field of a SubnetConfig or of its dict form."""
    if isinstance(cfg, dict):
        if name not in cfg:
            raise ValueError(f"config is missing field {name!r}")
        return cfg[name]
    return getattr(cfg, name)


def _one_hot(idx: np.ndarray, n_options: int, on: np.ndarray | None = None) -> np.ndarray:
    """``(n, k, n_options)`` one-hot of ``(n, k)`` indices; rows where ``on`` is False are all zero."""
    out = np.arange(n_options)[None, None, :] == idx[:, :, None]
    if on is not None:
        out &= on[:, :, None]
    return out


def translate_genes(genes: np.ndarray, src: SubnetEncoder, dst: SubnetEncoder) -> np.ndarray:
    """Re-index a ``(n, n_genes)`` matrix of ``src`` into ``dst`` (same space, e.g. fewer bit options)."""
    genes = np.asarray(genes, dtype=np.int64)
    if space_to_dict(src.space) != space_to_dict(dst.space):
        raise ValueError("cannot translate genes between encoders of different search spaces")
    out = np.empty_like(genes)
    for name, seg in src.segments.items():
        target = dst.segments[name]
        lookup = {o: i for i, o in enumerate(target.options)}
        missing = [o for o in seg.options if o not in lookup]
        if missing:
            raise ValueError(f"{name} options {missing} are not encodable by the target encoder ({target.options})")
        table = np.asarray([lookup[o] for o in seg.options], dtype=np.int64)
        out[:, target.start : target.stop] = table[genes[:, seg.start : seg.stop]]
    return out
