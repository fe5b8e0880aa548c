"""Reading supernet weights in every layout training meets (through :mod:`qfa.checkpoint`), with errors
that name the file: ``--init``, ``--teacher``, and the final ``supernet.pt``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as qckpt
from ..networks import QFAMobileNetV3
from .ckpt import FORMAT as TRAIN_FORMAT
from .ckpt import CheckpointError, check_model_config

OFA_FP, QFA_PUBLISHED, QFA_SUPERNET, QFA_TRAIN = "Once-for-All FP", "published QFA", "qfa supernet", "qfa training"


def read_checkpoint(path: str | os.PathLike) -> tuple[str, Any]:
    """``(layout, payload)`` of a weights file: one of the four layouts above."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own text would suggest weights_only=False, i.e. turning off the safe loader
        raise CheckpointError(f"{str(path)!r} is corrupt or not a torch checkpoint ({type(err).__name__})") from err
    if isinstance(payload, Mapping) and payload.get("kind") == qckpt.FORMAT_KIND:
        return QFA_SUPERNET, payload
    if isinstance(payload, Mapping) and payload.get("format") == TRAIN_FORMAT:
        return QFA_TRAIN, payload
    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} holds no state dict of tensors; not a supernet checkpoint")
    if any("_quantizer" in k for k in state):
        return QFA_PUBLISHED, state
    return OFA_FP, state


def load_into(model: nn.Module, path: str | os.PathLike) -> str:
    """Load the weights at ``path`` into ``model`` (same architecture); returns the layout name."""
    layout, payload = read_checkpoint(path)
    try:
        if layout == QFA_SUPERNET:
            check_model_config(path, _arch(payload["model_kwargs"]), _arch(model.config_kwargs))
            qckpt.load_supernet(path, model)
        elif layout == QFA_TRAIN:
            check_model_config(path, _arch(payload["model_config"]), _arch(model.config_kwargs))
            model.load_state_dict(payload["model"])
        elif layout == QFA_PUBLISHED:
            qckpt.load_published_qfa(model, payload)
        else:
            qckpt.load_ofa_fp(model, payload)
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r} ({layout} layout) does not fit this supernet: {err}") from err
    return layout


def _arch(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # What must match to share weights; bit-width options and resolutions may change between phases.
    return {k: v for k, v in kwargs.items() if k in ("n_classes", "width_mult", "ks_list", "expand_list", "depth_list")}


def load_initial_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """``--init``: start from an OFA FP or a QFA / qfa checkpoint; returns a log line."""
    layout = load_into(model, path)
    return f"initialised from {path} ({layout} layout)"


def load_teacher(path: str | os.PathLike, student: nn.Module, device: torch.device) -> tuple[nn.Module, bool, str]:
    """``--teacher``: a full-precision network with the student's architecture in its max, all-32-bit
    mode, in eval mode on ``device``. Returns ``(teacher, needs_calibration, log line)``:
    BN statistics of an OFA FP checkpoint belong to its max net and are used as they are; those of a
    qfa checkpoint belong to whatever subnet was calibrated last, so the caller recalibrates."""
    kwargs = dict(student.config_kwargs)
    teacher = QFAMobileNetV3(**kwargs)
    layout = load_into(teacher, path)
    teacher.set_full_precision()
    teacher.to(device).eval()
    return teacher, layout != OFA_FP, f"teacher: {path} ({layout} layout), full-precision max subnet, eval mode"


def save_trained_supernet(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """The trained supernet in the qfa format (``qfa.checkpoint.load_supernet`` reads it), atomically."""
    qckpt.save_supernet(model, path, extra=extra)
    return Path(path)
