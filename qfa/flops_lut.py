"""The published LUT-FLOPs metric (docs/metrics.md): FLOPs look-up tables in the published layout, the
closed formula that reproduces the published table, and the published search's rule that scores a
quantized subnet with such a table.

A table maps resolution -> ``mobile_inverted_blocks`` (block 0, then one entry per elastic block, each
mapping ``(k, e)`` to ``[total, expand, depthwise, project]`` MFLOPs) and ``other_blocks`` (``0`` stem,
``n+2`` final expand, ``n+3`` feature mix, ``n+4`` classifier, for ``n`` elastic blocks; MFLOPs). The
published file is a pickled ``.npy`` dict with int / tuple keys; its JSON form has string keys
(``"224"``, ``"3,4"``, ``"22"``). Both read into the same canonical form (:func:`normalise_table`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .networks.arch import (
    BASE_FEATURE_MIX_WIDTH,
    BASE_FINAL_EXPAND_WIDTH,
    BASE_STEM_WIDTH,
    BLOCK0_KERNEL,
    IN_CHANNELS,
    MBV3_STAGES,
    STEM_KERNEL,
    STEM_STRIDE,
)
from .nn.se import se_mid_channels
from .space import QLAYERS_PER_BLOCK, SearchSpace

BLOCK0_ENTRY = (BLOCK0_KERNEL, 1)  # block 0: kernel 3, expand 1 (no expand conv)
PARTS = ("total", "expand", "depthwise", "project")
OTHER_NAMES = ("stem", "final expand", "feature mix", "classifier")
MAX_BITS = 8  # every bit-width is capped at 8 (the published rule); 32 counts as 8
MIN_RESOLUTION = 2 ** (1 + sum(s.stride == 2 for s in MBV3_STAGES))  # the last feature map r // 32 is >= 1
# Canonical table: {resolution: {"mobile_inverted_blocks": [{(k, e): (total, expand, dw, project)}],
# "other_blocks": {index: mflops}}}
Table = dict[int, dict[str, Any]]


def other_keys(n_blocks: int) -> tuple[int, int, int, int]:
    """``other_blocks`` keys of the stem, final expand, feature mix and classifier."""
    return (0, n_blocks + 2, n_blocks + 3, n_blocks + 4)


# ----------------------------------------------------------------------------- the closed formula


def _conv_flops(c_out: int, c_in_per_group: int, k: int, hw: int) -> int:
    """FLOPs of a conv as the published table counts them: ``C_out * (C_in / groups * k^2 + 2) * H * W``."""
    return c_out * (c_in_per_group * k * k + 2) * hw


def formula_entries(space: SearchSpace, n_classes: int, resolution: int) -> dict[str, Any]:
    """The published table's entries at ``resolution`` for the MobileNetV3 template of ``space`` (canonical
    form, MFLOPs). Reproduces every number of the published ``lut_flops_1.20.npy`` (tests): widths
    ``round(C * width_mult)`` of the width-1.0 template (input and classes too), expand width
    ``round(C_in * e)``, SE (with biases) inside the depthwise entry, stage input sizes ``r // 2^k``, a
    strided depthwise output by conv arithmetic, and a block's total counting its project conv at that
    size while its project entry uses ``r // 2^k``."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(
            f"published_lut_flops needs resolution >= {MIN_RESOLUTION} (the published table's last feature map "
            f"r // {MIN_RESOLUTION} is empty below), got {resolution}"
        )

    def width(c: int) -> int:
        return round(c * space.width_mult)  # Python 3 round, as the published table generator

    def block(c_in: int, c_out: int, mid: int, k: int, h_in: int, h_dw: int, h_proj: int, se: bool, expand: bool):
        fe = _conv_flops(mid, c_in, 1, h_in * h_in) if expand else 0
        fd = _conv_flops(mid, 1, k, h_dw * h_dw)
        if se:
            s = se_mid_channels(mid)
            fd += s * (mid + 1) + mid * (s + 1)  # reduce and expand 1x1 convs with biases, on the pooled map
        fp = _conv_flops(c_out, mid, 1, h_proj * h_proj)
        total = fe + fd + _conv_flops(c_out, mid, 1, h_dw * h_dw)
        return tuple(v / 1e6 for v in (total, fe, fd, fp))

    r = resolution
    level = 1  # feature maps are r // 2^level
    stem = width(BASE_STEM_WIDTH)
    h0 = r // 2**level
    blocks = [{(k, 1): block(stem, stem, stem, k, h0, h0, h0, False, False) for k in _block0_kernels(space)}]
    c_in = stem
    for stage in MBV3_STAGES:
        c_out = width(stage.base_width)
        for j in range(space.max_depth):
            stride = stage.stride if j == 0 else 1
            h_in = r // 2**level
            h_dw = (h_in - 1) // stride + 1  # odd kernel k, padding k // 2
            level += 1 if stride == 2 else 0
            h_proj = r // 2**level
            blocks.append(
                {
                    (k, e): block(c_in, c_out, round(c_in * e), k, h_in, h_dw, h_proj, stage.se, True)
                    for k in space.ks_list
                    for e in space.expand_list
                }
            )
            c_in = c_out
    final, mix = width(BASE_FINAL_EXPAND_WIDTH), width(BASE_FEATURE_MIX_WIDTH)
    h_last = r // 2**level
    other = (
        _conv_flops(stem, width(IN_CHANNELS), STEM_KERNEL, (r // STEM_STRIDE) ** 2),
        _conv_flops(final, c_in, 1, h_last * h_last),
        _conv_flops(mix, final, 1, 1),
        mix * width(n_classes),  # linear: no +2
    )
    keys = other_keys(len(blocks) - 1)
    return {"mobile_inverted_blocks": blocks, "other_blocks": {k: v / 1e6 for k, v in zip(keys, other, strict=True)}}


def _block0_kernels(space: SearchSpace) -> tuple[int, ...]:
    """Kernel sizes the published table lists for block 0 (all of the space's; only k=3 is scored)."""
    return tuple(sorted({BLOCK0_KERNEL, *space.ks_list}))


# ----------------------------------------------------------------------------- reading and writing tables


def _int_key(key: object, what: str, source: str) -> int:
    try:
        return int(key)  # JSON keys are strings
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {what} key {key!r} is not an int") from None


def _ke_key(key: object, where: str, source: str) -> tuple[int, int]:
    parts = key.split(",") if isinstance(key, str) else key
    try:
        k, e = (int(p) for p in parts)
        return k, e
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {where}: key {key!r} is not a (k, e) pair") from None


def _numbers(value: object, n: int, where: str, source: str) -> tuple[float, ...]:
    try:
        out = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.size != n or not np.all(np.isfinite(out)) or np.any(out < 0):
        want = f"[{', '.join(PARTS)}] MFLOPs" if n > 1 else "a number of MFLOPs"
        raise ValueError(f"{source}: {where}: expected {want} (finite, >= 0), got {value!r}")
    return tuple(out.tolist())


def normalise_table(raw: object, source: str = "FLOPs table") -> Table:
    """The canonical form of a table in the published layout (``.npy`` dict or its JSON form)."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{source}: expected a non-empty mapping resolution -> entries, got {type(raw).__name__}")
    table: Table = {}
    for r_key, entry in raw.items():
        r = _int_key(r_key, "resolution", source)
        where = f"resolution {r}"
        if not isinstance(entry, Mapping) or not {"mobile_inverted_blocks", "other_blocks"} <= set(entry):
            raise ValueError(f"{source}: {where}: needs 'mobile_inverted_blocks' and 'other_blocks'")
        blocks = entry["mobile_inverted_blocks"]
        other = entry["other_blocks"]
        if isinstance(blocks, (str, bytes, Mapping)) or not hasattr(blocks, "__len__"):
            raise ValueError(f"{source}: {where}: 'mobile_inverted_blocks' must be a list, got {type(blocks).__name__}")
        if not isinstance(other, Mapping):
            raise ValueError(f"{source}: {where}: 'other_blocks' must be a mapping, got {type(other).__name__}")
        norm_blocks = []
        for i, b in enumerate(blocks):
            if not isinstance(b, Mapping):
                raise ValueError(f"{source}: {where}, block {i}: expected a mapping (k, e) -> entry")
            norm_blocks.append(
                {
                    _ke_key(ke, f"{where}, block {i}", source): _numbers(v, 4, f"{where}, block {i}, {ke}", source)
                    for ke, v in b.items()
                }
            )
        table[r] = {
            "mobile_inverted_blocks": norm_blocks,
            "other_blocks": {
                _int_key(k, f"{where} other_blocks", source): _numbers(v, 1, f"{where}, other block {k}", source)[0]
                for k, v in other.items()
            },
        }
    return table


def read_table(path: str | os.PathLike, *, allow_pickle: bool = False) -> Table:
    """A table from a JSON file, or from the published pickled ``.npy`` (only with ``allow_pickle``:
    numpy's pickle loader runs code from the file)."""
    path = Path(path)
    source = f"--flops-lut {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: file not found")
    if path.suffix == ".npy":
        if not allow_pickle:
            raise ValueError(
                f"{source}: a .npy table is a pickle, and loading it runs code from the file; pass --allow-pickle "
                "if you trust it, or convert it once to JSON (qfa cost --flops-lut FILE.npy --allow-pickle "
                "--write-lut FILE.json)"
            )
        try:
            raw = np.load(path, allow_pickle=True)
            raw = raw.item() if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 0 else raw
        except Exception as err:  # numpy / pickle errors of every kind
            raise ValueError(f"{source}: not a readable .npy table ({type(err).__name__}: {err})") from None
    else:
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{source}: not a JSON table ({err})") from None
    return normalise_table(raw, source)


def table_to_json(table: Table) -> dict[str, Any]:
    """The JSON form of a canonical table (string keys ``"224"``, ``"3,4"``, ``"22"``)."""
    return {
        str(r): {
            "mobile_inverted_blocks": [
                {f"{k},{e}": list(v) for (k, e), v in sorted(b.items())} for b in entry["mobile_inverted_blocks"]
            ],
            "other_blocks": {str(k): v for k, v in sorted(entry["other_blocks"].items())},
        }
        for r, entry in sorted(table.items())
    }


# ----------------------------------------------------------------------------- scoring


class FlopsLUT:
    """Published-rule LUT-FLOPs of subnets of ``space``, from a table (checked against the space) or,
    with ``table=None``, from the closed formula at any resolution (``n_classes`` outputs).

    Raises ``ValueError`` naming what a table lacks: resolutions of the space, blocks, ``(k, e)`` entries
    of the space's options, other blocks.
    """

    def __init__(self, space: SearchSpace, n_classes: int, table: Table | None = None, source: str = "") -> None:
        self.space, self.n_classes, self.source = space, n_classes, source or "closed formula"
        self._table = table
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if table is not None:
            missing = [r for r in space.resolutions if r not in table]
            if len(missing) == len(space.resolutions):
                raise ValueError(
                    f"{self.source}: no entries for any of the supernet's resolutions {_short(missing)} (the table "
                    f"has {_short(sorted(table))}: a table of another supernet?)"
                )
            if missing:
                raise ValueError(
                    f"{self.source}: no entries for resolution(s) {_short(missing)} (the supernet uses "
                    f"{_short(space.resolutions)}; the table has {_short(sorted(table))})"
                )
            for r in sorted(table):
                self._arrays[r] = self._to_arrays(r, table[r])

    def entries(self, resolution: int) -> dict[str, Any]:
        """The canonical entries at ``resolution`` (the table's, or the formula's)."""
        if self._table is None:
            return formula_entries(self.space, self.n_classes, resolution)
        if resolution not in self._table:
            raise ValueError(
                f"{self.source}: no entries for resolution {resolution} (has {_short(sorted(self._table))})"
            )
        return self._table[resolution]

    def table(self, resolutions: tuple[int, ...] | None = None) -> Table:
        """The canonical table at ``resolutions`` (default: the space's)."""
        return {r: self.entries(r) for r in (resolutions or self.space.resolutions)}

    def _to_arrays(self, r: int, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(block0 (4,), blocks (n_blocks, K, E, 4), other (4,))`` for the space's options, checked."""
        s = self.space
        blocks = entry["mobile_inverted_blocks"]
        where = f"{self.source}: resolution {r}"
        if len(blocks) != s.n_blocks + 1:
            raise ValueError(
                f"{where}: 'mobile_inverted_blocks' has {len(blocks)} entries, expected {s.n_blocks + 1} "
                f"(block 0, then the {s.n_blocks} elastic blocks)"
            )
        if BLOCK0_ENTRY not in blocks[0]:
            raise ValueError(f"{where}, block 0: lacks the (k, e) entry {BLOCK0_ENTRY}")
        out = np.empty((s.n_blocks, len(s.ks_list), len(s.expand_list), 4))
        for i, b in enumerate(blocks[1:], start=1):
            lacking = [(k, e) for k in s.ks_list for e in s.expand_list if (k, e) not in b]
            if lacking:
                raise ValueError(f"{where}, block {i}: lacks the (k, e) entries {', '.join(map(str, lacking))}")
            out[i - 1] = [[b[(k, e)] for e in s.expand_list] for k in s.ks_list]
        keys = other_keys(s.n_blocks)
        lacking = [f"{k} ({name})" for k, name in zip(keys, OTHER_NAMES, strict=True) if k not in entry["other_blocks"]]
        if lacking:
            raise ValueError(f"{where}: 'other_blocks' lacks {', '.join(lacking)}")
        other = np.array([entry["other_blocks"][k] for k in keys])
        return np.asarray(blocks[0][BLOCK0_ENTRY], dtype=np.float64), out, other

    def _arrays_at(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if r not in self._arrays:
            self._arrays[r] = self._to_arrays(r, self.entries(r))
        return self._arrays[r]

    def score(
        self,
        ks: np.ndarray,
        e: np.ndarray,
        active: np.ndarray,
        w_bits: np.ndarray,
        a_bits: np.ndarray,
        resolution: np.ndarray,
    ) -> np.ndarray:
        """LUT-FLOPs (not millions) of N subnets by the published rule: each active elastic block adds
        ``total - (fe + fd + fp) + (fe * b_e + fd * b_d + fp * b_p) / 64`` with ``b = min(w, 8) * min(a, 8)``
        of its expand / depthwise / project layer (block 0 likewise); the stem counts at W32A32 (x 1), the
        final expand and feature mix at their bits, the classifier at W8A8 (x 1). Arrays as in
        :meth:`qfa.cost.CostModel.evaluate_batch` (checked), ``active`` the ``(N, n_blocks)`` mask."""
        s = self.space
        uniq, inv = np.unique(resolution, return_inverse=True)
        parts = [self._arrays_at(int(r)) for r in uniq]
        block0 = np.stack([p[0] for p in parts])[inv]  # (N, 4)
        blocks = np.stack([p[1] for p in parts])  # (U, B, K, E, 4)
        other = np.stack([p[2] for p in parts])[inv]  # (N, 4)
        k_idx = np.searchsorted(s.ks_list, ks)
        e_idx = np.searchsorted(s.expand_list, e)
        ent = blocks[inv[:, None], np.arange(s.n_blocks)[None, :], k_idx, e_idx]  # (N, B, 4)
        q = (np.minimum(w_bits, MAX_BITS) * np.minimum(a_bits, MAX_BITS)) / MAX_BITS**2  # (N, Q)
        q0 = 2 + QLAYERS_PER_BLOCK * np.arange(s.n_blocks)  # each block's expand layer in w_bits / a_bits
        per_block = (
            ent[..., 0]
            - ent[..., 1:].sum(axis=-1)
            + ent[..., 1] * q[:, q0]
            + ent[..., 2] * q[:, q0 + 1]
            + ent[..., 3] * q[:, q0 + 2]
        )
        total = (per_block * active).sum(axis=1)
        # block 0: no expand conv (its entry is 0); depthwise and pointwise are layers 0 and 1
        total += block0[:, 0] - block0[:, 1:].sum(axis=1) + block0[:, 2] * q[:, 0] + block0[:, 3] * q[:, 1]
        total += other[:, 0] + other[:, 1] * q[:, -3] + other[:, 2] * q[:, -2] + other[:, 3]
        return total * 1e6


def _short(values) -> str:
    """``128..224 step 4`` for an arithmetic run, else the list."""
    v = sorted(values)
    if len(v) > 3 and len({b - a for a, b in zip(v, v[1:], strict=False)}) == 1:
        return f"{v[0]}..{v[-1]} step {v[1] - v[0]}"
    return ", ".join(map(str, v))
