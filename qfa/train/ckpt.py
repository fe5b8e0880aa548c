"""Training checkpoints: atomic writes, RNG capture, and loading with clear errors.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so it loads
with ``weights_only=True`` (no code runs on load). Writes are atomic (:func:`qfa.io.atomic_save`:
a temporary file in the same directory, fsynced, then ``os.replace``-d over the target): a reader
(or a resumed run after a crash) sees either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import TMP_PREFIX, atomic_save, remove_stale_temps
from .distributed import DistContext, gather_object

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LAST",
    "TMP_PREFIX",
    "CheckpointError",
    "capture_rng",
    "check_model_config",
    "load_training_state",
    "remove_stale_temps",
    "resolve_resume",
    "resolve_resume_on_all_ranks",
    "restore_rng",
    "save_atomic",
]

FORMAT = "qfa-train"
FORMAT_VERSION = 1
LAST = "last.pt"


save_atomic = atomic_save  # the name this module has always exported


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, corrupt, of another format, or for another model."""


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (initialised) CUDA generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002  (the legacy global state is what we save)
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }  # fmt: skip


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- loading


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint written by :class:`qfa.train.Trainer`; :class:`CheckpointError` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip/pickle errors of every kind: the file is torn or not a checkpoint
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint ({type(err).__name__}: {err}). "
            "Delete it or resume from another file."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a qfa training checkpoint (format {found!r}, expected {FORMAT!r}); "
            "to start from supernet weights use --init instead of --resume"
        )
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format_version {state.get('format_version')!r}; "
            f"this qfa reads version {FORMAT_VERSION}"
        )
    missing = [k for k in ("model", "model_config", "optimizer", "scheduler", "rng", "epoch", "batch", "step")
               if k not in state]  # fmt: skip
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}: it is incomplete")
    return state


def check_model_config(path: str | os.PathLike, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """:class:`CheckpointError` naming every architecture setting that differs."""
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
        for k in keys
        if _normalise(saved.get(k)) != _normalise(current.get(k))
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {str(path)!r} was written for a different supernet: " + "; ".join(diffs))


def _normalise(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def resolve_resume(resume: str | None, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``None``/``"none"`` -> none; ``"auto"`` -> ``out_dir/last.pt`` if
    it exists; otherwise the given path, which must exist."""
    if resume is None or resume.lower() in ("", "none", "no"):
        return None
    if resume.lower() == "auto":
        last = Path(out_dir) / LAST
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume!r}: no such checkpoint file")
    return path


def resolve_resume_on_all_ranks(resume: str | None, out_dir: str | os.PathLike, ctx: DistContext) -> Path | None:
    """:func:`resolve_resume` on every rank, checked to agree before any rank loads anything.

    Rank 0 alone writes checkpoints, so on a cluster every rank finds ``OUT/last.pt`` only when ``--out``
    is on a filesystem that every node sees. Were one rank to resume while another starts afresh,
    they would wait for each other's collectives forever; instead every rank raises the same
    :class:`CheckpointError` (a rank's own error, or which ranks found which file)."""
    try:
        found, error = resolve_resume(resume, out_dir), None
    except CheckpointError as err:
        if not ctx.distributed:
            raise
        found, error = None, str(err)
    views = gather_object((None if found is None else str(found), error), ctx)
    errors = _ranks_by_value([e for _, e in views])
    errors.pop(None, None)
    if errors:
        raise CheckpointError("; ".join(f"{ranks}: {e}" for e, ranks in errors.items()))
    paths = _ranks_by_value([p for p, _ in views])
    if len(paths) > 1:
        seen = "; ".join(f"{ranks}: {p or 'none'}" for p, ranks in paths.items())
        raise CheckpointError(
            f"--resume {resume}: the ranks found different checkpoints ({seen}); rank 0 alone writes "
            "checkpoints, so --out must be a directory that every node sees (a shared filesystem)"
        )
    return found


def _ranks_by_value(values: list[Any]) -> dict[Any, str]:
    """``{value: "rank 3"}`` / ``{value: "ranks 0, 1, 2"}``: which ranks hold each value."""
    ranks: dict[Any, list[int]] = {}
    for r, v in enumerate(values):
        ranks.setdefault(v, []).append(r)
    return {v: f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs)) for v, rs in ranks.items()}
