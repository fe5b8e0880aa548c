"""The ``qfa`` command surface (issue 14): one flag dialect, one checkpoint loader, and the bugs a new
user hit. Each test fails on the code before the issue was fixed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qfa
from qfa.checkpoint import save_supernet
from qfa.cli import entry

RESOLUTIONS = (8, 12, 16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny 10-class supernet and a subnet config of it."""
    d = tmp_path_factory.mktemp("surface")
    torch.manual_seed(0)
    model = qfa.QFAMobileNetV3(n_classes=10, width_mult=0.25, resolutions=RESOLUTIONS)
    save_supernet(model, d / "s.pt")
    space = model.space
    cfg = space.make_config(ks=max(space.ks_list), e=max(space.expand_list), d=max(space.depth_list), w_bits=4,
                            a_bits=4, resolution=12)  # fmt: skip
    (d / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    return {p.stem: p for p in d.iterdir()} | {"dir": d}


def _entry(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = entry(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------- bug 1: class lists by name


def _image_tree(root: Path, train: list[str], val: list[str]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_val_classes_must_match_train_by_name(tmp_path, capsys):
    from qfa.data import build_loaders

    data = _image_tree(tmp_path / "d", ["a", "b", "c"], ["a", "c", "z"])
    with pytest.raises(ValueError, match=r"val/ lacks \['b'\], val/ has extra \['z'\]"):
        build_loaders(str(data), batch_size=2, resolution=8, workers=0)
    rc, _, err = _entry(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 1 and err.startswith("qfa train: error: ") and "lacks ['b']" in err and err.count("\n") == 1
    train, val = build_loaders(str(_image_tree(tmp_path / "ok", ["a", "b"], ["a", "b"])), 2, 8, workers=0)
    assert train.num_classes == val.num_classes == 2
