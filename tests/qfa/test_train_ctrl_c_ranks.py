"""Ctrl-C under torchrun: two gloo ranks of ``python -m qfa train`` (started as torchrun starts its
workers: environment rendezvous, each in its own session), SIGINT sent to one rank only or to both.

Checks: both ranks stop at the same step boundary (neither is left in a collective: both exit 130
within the time limit), rank 0 alone prints the one-line message, no traceback, ``last.pt`` holds the
step of the message and no temporary file is left, and the same command resumes from it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT_S = 180  # a launch takes 10-30 s on a loaded 2-core machine
STOP_TIMEOUT_S = 60  # from the signal to both exits: a few steps and a save (a rank left in a collective: 30 min)

# About 90 steps per epoch (digits, 8 images per rank): far more than the few before the signal takes effect.
TINY = [
    "--data", "digits", "--device", "cpu", "--width-mult", "0.25", "--ks-list", "3,5", "--expand-list", "2,3",
    "--depth-list", "1,2", "--bits", "2,4", "--resolutions", "16:24:8", "--batch-size", "8", "--subnets", "3",
    "--fp-epochs", "0", "--warmup-epochs", "0", "--epochs", "1", "--calib-batches", "1", "--val-subnets", "max",
    "--val-bits", "4", "--val-every", "0", "--ckpt-every", "0", "--log-every", "1", "--workers", "0", "--no-progress",
    "--seed", "5",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """``WORLD`` processes of ``python -m qfa train ARGS``, as torchrun's workers; logs in files."""

    def __init__(self, tmp: Path, name: str, args: list[str]) -> None:
        port = _free_port()
        self.logs = [(tmp / f"{name}-rank{r}.out", tmp / f"{name}-rank{r}.err") for r in range(WORLD)]
        self.procs = []
        for rank, (out, err) in enumerate(self.logs):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
            with out.open("w") as o, err.open("w") as e:
                cmd = [sys.executable, "-m", "qfa", "train", *args]
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e, start_new_session=True))

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait(self, timeout_s: float) -> list[int]:
        """Exit codes; on a timeout every process group is killed and the test fails with the logs."""
        deadline = time.monotonic() + timeout_s
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks did not exit within {timeout_s} s (one is left in a collective?):\n{self.tails()}")
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)

    def err(self, rank: int) -> str:
        return self.logs[rank][1].read_text()

    def tails(self) -> str:
        return "\n".join(f"--- rank {r} stderr:\n{self.err(r)[-3000:]}" for r in range(WORLD))


def _events(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _interrupt(tmp: Path, out: Path, ranks_signalled: list[int]) -> int:
    """Train, SIGINT ``ranks_signalled`` once the loop runs on both ranks; returns the step it stopped at."""
    ranks = Ranks(tmp, "cut", [*TINY, "--out", str(out)])
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e["event"] == "steps" for e in _events(out)):  # both ranks are in the loop (a step all-reduces)
            assert ranks.running(), ranks.tails()
            assert time.monotonic() < deadline, f"no step logged within {TIMEOUT_S} s:\n{ranks.tails()}"
            time.sleep(0.2)
        signalled_at = [e["step"] for e in _events(out) if e["event"] == "steps"][-1]
        for r in ranks_signalled:
            os.kill(ranks.procs[r].pid, signal.SIGINT)
        codes = ranks.wait(STOP_TIMEOUT_S)
    finally:
        ranks.kill()
    assert codes == [130] * WORLD, f"exit codes {codes}:\n{ranks.tails()}"
    for r in range(WORLD):
        assert "Traceback" not in ranks.err(r), ranks.tails()
    lines = ranks.err(0).splitlines()
    assert len(lines) == 1 and lines[0].startswith("qfa train: interrupted at step "), ranks.tails()
    assert "qfa train" not in ranks.err(1), "rank 1 printed too: one line per run"
    step = int(re.match(r"qfa train: interrupted at step (\d+)", lines[0]).group(1))
    assert signalled_at < step <= signalled_at + 40, (signalled_at, step)  # the next boundary the ranks agree on
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl"], "a temporary file was left"
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["batch"], state["epoch"], state["world_size"]) == (step, step, 0, WORLD)
    assert [e["event"] for e in _events(out)].count("epoch") == 1  # the interrupted epoch, logged once
    return step


def test_ctrl_c_on_one_rank_stops_every_rank_at_one_step_and_resumes(tmp_path):
    out = tmp_path / "run"
    step = _interrupt(tmp_path, out, ranks_signalled=[1])  # rank 1 only: rank 0 writes on its vote
    resumed = Ranks(tmp_path, "resume", [*TINY, "--out", str(out), "--max-steps", str(step + 2)])
    codes = resumed.wait(TIMEOUT_S)
    assert codes == [0] * WORLD, f"exit codes {codes}:\n{resumed.tails()}"
    assert f"resumed from {out / 'last.pt'} (epoch 1, batch {step}, step {step})" in resumed.logs[0][0].read_text()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step + 2
    events = _events(out)
    assert [e["event"] for e in events].count("start") == 1 and events[-1]["event"] == "final"


def test_ctrl_c_on_every_rank_stops_them_at_one_step(tmp_path):
    _interrupt(tmp_path, tmp_path / "run", ranks_signalled=[0, 1])  # what torchrun does when it gets Ctrl-C
