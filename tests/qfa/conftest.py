"""Fixtures of the qfa command tests (test_cli_errors.py, test_cli_surface.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qfa
from qfa.checkpoint import save_supernet

RESOLUTIONS = (8, 12, 16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny 10-class supernet, a garbage 'checkpoint', a truncated one and a subnet config."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = qfa.QFAMobileNetV3(n_classes=10, width_mult=0.25, resolutions=RESOLUTIONS)
    save_supernet(model, d / "s.pt")
    (d / "garbage.pt").write_bytes(b"not a pt")
    (d / "trunc.pt").write_bytes((d / "s.pt").read_bytes()[:3000])
    space = model.space
    cfg = space.make_config(
        ks=max(space.ks_list), e=max(space.expand_list), d=max(space.depth_list), w_bits=4, a_bits=4
    )
    (d / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    return {p.stem: p for p in d.iterdir()} | {"dir": d}
