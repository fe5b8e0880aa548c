"""Training checkpoints: atomic writes (also when the writer is killed), clear errors, RNG round trip."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from qfa import io as qfa_io
from qfa.train import ckpt


def _state(value: float = 1.0, n: int = 1000) -> dict:
    return {
        "format": ckpt.FORMAT,
        "format_version": ckpt.FORMAT_VERSION,
        "model": {"w": torch.full((n,), value)},
        "model_config": {"width_mult": 1.2, "ks_list": [3, 5, 7]},
        "optimizer": {},
        "scheduler": {},
        "rng": ckpt.capture_rng(),
        "epoch": 1,
        "batch": 0,
        "step": 7,
    }


def test_roundtrip_and_no_temp_files(tmp_path):
    path = ckpt.save_atomic(_state(2.0), tmp_path / "last.pt")
    state = ckpt.load_training_state(path)
    assert torch.equal(state["model"]["w"], torch.full((1000,), 2.0)) and state["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic(_state(1.0), path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic(_state(5.0), path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load_training_state(path)["model"]["w"], torch.full((1000,), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# Loads qfa/io.py by path: the writer needs neither the qfa package nor its heavy imports.
_WRITER = textwrap.dedent(
    f"""
    import importlib.util, sys, torch
    spec = importlib.util.spec_from_file_location("qfa_io", sys.argv[2])
    qfa_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qfa_io)
    i = 0
    while True:
        i += 1
        weights = {{"w": torch.full((2_000_000,), float(i))}}
        state = {{"format": {ckpt.FORMAT!r}, "format_version": {ckpt.FORMAT_VERSION!r}, "model": weights,
                 "model_config": {{}}, "optimizer": {{}}, "scheduler": {{}}, "rng": {{}},
                 "epoch": 0, "batch": 0, "step": i}}
        qfa_io.atomic_save(state, sys.argv[1])
        print(i, flush=True)
    """
)


def test_killed_writer_never_leaves_a_corrupt_checkpoint(tmp_path):
    """SIGKILL a process that rewrites an 8 MB checkpoint in a loop, at several random moments."""
    rng = random.Random(0)
    path = tmp_path / "last.pt"
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), qfa_io.__file__], stdout=subprocess.PIPE)
        proc.stdout.readline()  # at least one complete checkpoint exists
        time.sleep(rng.uniform(0.0, 0.5))  # then kill it at a random point of a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        state = ckpt.load_training_state(path)  # always a complete file
        assert torch.equal(state["model"]["w"], torch.full((2_000_000,), float(state["step"])))
        ckpt.remove_stale_temps(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    good = ckpt.save_atomic(_state(), tmp_path / "good.pt")
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    for path in (truncated, garbage):
        with pytest.raises(ckpt.CheckpointError, match=f"{path.name}.*corrupt or not a torch checkpoint"):
            ckpt.load_training_state(path)
    foreign = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a qfa training checkpoint.*--init"):
        ckpt.load_training_state(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({**_state(), "format_version": 99}, newer)
    with pytest.raises(ckpt.CheckpointError, match="format_version 99"):
        ckpt.load_training_state(newer)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in _state().items() if k != "optimizer"}, partial)
    with pytest.raises(ckpt.CheckpointError, match="lacks \\['optimizer'\\]"):
        ckpt.load_training_state(partial)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_training_state(tmp_path / "nope.pt")


def test_model_config_mismatch_names_the_settings():
    with pytest.raises(ckpt.CheckpointError, match="width_mult: checkpoint 1.2 vs this run 0.5") as err:
        ckpt.check_model_config(
            "x.pt", {"width_mult": 1.2, "ks_list": [3, 5, 7]}, {"width_mult": 0.5, "ks_list": (3, 5, 7)}
        )
    assert "ks_list" not in str(err.value)  # lists and tuples compare equal


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"x")
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "last.pt"
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_rng_roundtrip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002  (the legacy global state is what training code consumes)
    torch.manual_seed(3)
    ckpt.save_atomic(_state(), tmp_path / "last.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    random.seed(9)
    np.random.seed(9)  # noqa: NPY002
    torch.manual_seed(9)
    ckpt.restore_rng(ckpt.load_training_state(tmp_path / "last.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
