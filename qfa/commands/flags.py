"""The flags every ``qfa`` command spells the same way, and the one way commands load a checkpoint.

``--checkpoint FILE`` (``--ckpt``: a hidden alias, the old spelling of train/eval/calibrate): the
supernet, in any layout :func:`qfa.checkpoint.load_any` reads. ``--subnets``: subnet configs.
``--config FILE``: an options file (YAML / TOML / JSON with the flags' names as keys), nothing else.
"""

from __future__ import annotations

import argparse
import os

from ..checkpoint import LoadedSupernet, load_any
from ..data import DIGITS, num_classes

CHECKPOINT_HELP = (
    "supernet checkpoint: qfa train's OUT/supernet.pt or OUT/last.pt, qfa calibrate's output, or a "
    "published QFA / Once-for-All state dict"
)
SUBNETS_HELP = (
    "subnet configs: a SubnetConfig JSON file, a .jsonl of them (or of qfa collect records), or a "
    "qfa search result (with --index)"
)


def add_checkpoint_arg(parser: argparse.ArgumentParser, *, required: bool = True, help: str = CHECKPOINT_HELP) -> None:
    """``--checkpoint FILE``, with ``--ckpt`` accepted but not shown."""
    parser.add_argument("--checkpoint", required=required, metavar="FILE", help=help)
    parser.add_argument("--ckpt", dest="checkpoint", help=argparse.SUPPRESS)


def add_subnets_arg(parser: argparse.ArgumentParser, *, required: bool = False, help: str = SUBNETS_HELP) -> None:
    """``--subnets FILE``: the subnet configs of a command."""
    parser.add_argument("--subnets", required=required, metavar="FILE", help=help)


def load_checkpoint(
    path: str | os.PathLike, data: str | None, backend: str | None = None
) -> tuple[LoadedSupernet, str]:
    """``(checkpoint, data)``: ``--checkpoint`` loaded with :func:`qfa.checkpoint.load_any`, and the data
    to use: ``--data`` when given, else the run's (stored in the checkpoint), else digits. The
    checkpoint's classes are checked against the data's (otherwise an IndexError deep in the loss, or
    with fewer classes silently wrong accuracies)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint: file not found: {path}")
    loaded = load_any(path, num_classes(data or DIGITS), backend)  # the class count is used by published layouts
    data = data or loaded.run.get("data") or DIGITS
    n = num_classes(data)
    if loaded.model.n_classes != n:
        raise ValueError(f"--checkpoint has {loaded.model.n_classes} classes but --data {data!r} has {n}")
    return loaded, data
