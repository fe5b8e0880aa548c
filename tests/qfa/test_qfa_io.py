"""qfa.io: atomic writes leave the old file intact and no temporary file when they fail."""

from __future__ import annotations

import pickle

import pytest
import torch

from qfa import io as qfa_io


def test_atomic_save_roundtrip_and_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "obj.pt"  # the directory is created
    assert qfa_io.atomic_save({"w": torch.ones(3)}, path) == path
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    old = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        qfa_io.atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old and [p.name for p in path.parent.iterdir()] == ["obj.pt"]
    # a failed first write leaves nothing at all
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        qfa_io.atomic_save({"bad": lambda: None}, tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists() and [p.name for p in tmp_path.iterdir()] == ["sub"]


def test_atomic_path_suffix_text_and_stale_temps(tmp_path):
    with qfa_io.atomic_path(tmp_path / "a.npz", suffix=".npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(qfa_io.TMP_PREFIX) and tmp.suffix == ".npz"
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.npz").read_bytes() == b"x"
    qfa_io.atomic_write_text(tmp_path / "r.json", "{}\n")
    with pytest.raises(RuntimeError), qfa_io.atomic_path(tmp_path / "r.json") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("writer failed")
    assert (tmp_path / "r.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "r.json"]
    stale = tmp_path / f"{qfa_io.TMP_PREFIX}last.pt.abc"  # what a killed writer leaves
    stale.write_bytes(b"torn")
    assert qfa_io.remove_stale_temps(tmp_path) == [stale] and not stale.exists()
    staging = tmp_path / f"{qfa_io.TMP_PREFIX}export-subnet.xyz"  # a killed export's staging directory
    (staging / "inner").mkdir(parents=True)
    (staging / "inner" / "subnet.pt").write_bytes(b"torn")
    assert qfa_io.remove_stale_temps(tmp_path) == [staging] and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "r.json"]
