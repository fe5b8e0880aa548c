"""Two "nodes" on this machine: two ``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d``
launches on localhost (gloo, a tiny supernet, a few steps), as a cluster user runs ``qfa train``.

Checks: every rank ends with the same weights; rank 0 alone writes (the other node's ``--out`` stays
empty); the run resumes across the two nodes; each rank trains and recalibrates on its own shard
(global rank); recalibration statistics are the mean of the per-rank ones (spec 3); evaluation
counts are summed over the four ranks; no warnings on stderr, with and without channels_last; a
rank that dies makes every other process exit with a clear message instead of hanging.
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
WORKER = Path(__file__).with_name("multinode_worker.py")
NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
RUN_TIMEOUT_S = 300  # one launch on a loaded 2-core machine takes 20-60 s

TINY = [
    "--device", "cpu", "--width-mult", "0.25", "--ks-list", "3,5", "--expand-list", "2,3", "--depth-list", "1,2",
    "--bits", "2,4,32", "--resolutions", "16:24:8", "--batch-size", "8", "--subnets", "3", "--fp-epochs", "0",
    "--warmup-epochs", "0", "--epochs", "1", "--calib-batches", "1", "--val-subnets", "max", "--val-bits", "4",
    "--no-progress", "--seed", "3",
]  # fmt: skip

_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
_PROC_CHILDREN = Path(f"/proc/self/task/{os.getpid()}/children").exists()  # Linux with CONFIG_PROC_CHILDREN
pytestmark = pytest.mark.skipif(
    not (_PROC_CHILDREN and _GLOO),
    reason="needs Linux's /proc/PID/task/TID/children (to find torchrun's workers) and torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (torchrun starts each worker in its own session)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class Node:
    """One ``torchrun`` launch (its own session), stdout/stderr in files."""

    def __init__(self, tmp: Path, name: str, port: int, entry: list[str]) -> None:
        self.stdout, self.stderr = tmp / f"{name}.out", tmp / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", str(PER_NODE),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"qfa-test-{port}",
            "--max-restarts", "0", *entry,
        ]  # fmt: skip
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)

    def workers(self) -> list[int]:
        return _descendants(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the launcher and every worker (they have sessions of their own)."""
        victims = [self.proc.pid, *self.workers()]
        for pid in victims:
            try:
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def err(self) -> str:
        return self.stderr.read_text()

    def out(self) -> str:
        return self.stdout.read_text()


def _launch(tmp: Path, entries: list[list[str]]) -> list[Node]:
    port = _free_port()
    return [Node(tmp, f"node{i}-{port}", port, entry) for i, entry in enumerate(entries)]


def _wait(nodes: list[Node], timeout_s: float) -> list[int]:
    """Exit codes of all nodes; on a timeout every process is killed and the test fails with their logs."""
    deadline = time.monotonic() + timeout_s
    try:
        return [n.proc.wait(timeout=max(0.1, deadline - time.monotonic())) for n in nodes]
    except subprocess.TimeoutExpired:
        logs = "\n".join(f"--- {n.stderr.name}:\n{n.err()[-3000:]}" for n in nodes)
        pytest.fail(f"the two-node run did not finish within {timeout_s} s:\n{logs}")
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()


def _train(tmp: Path, dump: Path, outs: list[Path], extra: list[str]) -> list[Node]:
    dump.mkdir(parents=True, exist_ok=True)
    nodes = _launch(tmp, [[str(WORKER), str(dump), *TINY, "--out", str(out), *extra] for out in outs])
    codes = _wait(nodes, RUN_TIMEOUT_S)
    for n, code in zip(nodes, codes, strict=True):
        assert code == 0, f"{n.stderr.name} exited with {code}:\n{n.err()[-4000:]}"
        assert not re.search(r"warn", n.err(), re.IGNORECASE), f"warnings on {n.stderr.name}:\n{n.err()[-4000:]}"
    return nodes


def _views(dump: Path) -> list[dict]:
    views = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [v["rank"] for v in views] == list(range(WORLD)) and {v["world_size"] for v in views} == {WORLD}
    assert sorted(v["local_rank"] for v in views) == [0, 0, 1, 1]
    return views


def _check_ranks_agree(views: list[dict]) -> None:
    ref = views[0]
    for v in views[1:]:
        for k, t in ref["model"].items():
            assert torch.equal(t, v["model"][k]), f"rank {v['rank']}: {k} differs from rank 0's"
        for k, t in ref["synced_stats"].items():
            assert torch.equal(t, v["synced_stats"][k]), f"rank {v['rank']}: recalibrated {k} differs from rank 0's"


def _check_shards(views: list[dict]) -> None:
    train = [set(v["train_shard"]) for v in views]
    assert len({len(v["train_shard"]) for v in views}) == 1, "unequal training shards"
    assert set().union(*train) == set(views[0]["train_indices"]), "the training shards miss samples"
    assert sum(map(len, train)) - len(set().union(*train)) < WORLD, "training shards overlap beyond the padding"
    calib = [v["calib_shard"] for v in views]
    assert all(calib), "a rank has no recalibration batch"
    assert sorted(i for c in calib for i in c) == sorted(views[0]["calib_indices"]), "calibration shards overlap"


def _check_recalibration_and_eval(views: list[dict]) -> None:
    """Spec 3: the synced statistics are the mean of the per-rank ones; evaluation counts are summed."""
    names = list(views[0]["synced_stats"])
    differ = [k for k in names if not all(torch.equal(v["local_stats"][k], views[0]["local_stats"][k]) for v in views)]
    assert differ, "every rank recalibrated to the same statistics: the shards are not different"
    for k in names:
        mean = torch.stack([v["local_stats"][k].double() for v in views]).mean(0)
        torch.testing.assert_close(views[0]["synced_stats"][k].double(), mean, rtol=1e-5, atol=1e-6, msg=k)
    for v in views:
        sharded, full = v["sharded_eval"], v["full_eval"]
        assert sharded["n"] == full["n"] > 0, f"rank {v['rank']}: {sharded['n']} images counted, {full['n']} exist"
        assert abs(sharded["top1"] - full["top1"]) <= 100.0 / full["n"] + 1e-9, (v["rank"], sharded, full)
        assert sharded["loss"] == pytest.approx(full["loss"], rel=1e-4), (v["rank"], sharded, full)


def test_two_nodes_train_resume_shard_and_sync(tmp_path):
    outs = [tmp_path / "out-node-a", tmp_path / "out-node-b"]  # as if each node had its own disk
    # Two epochs of 2 steps: full-precision max network, then QFA (the subnets under no_sync); stop at step 3.
    steps = ["--fp-epochs", "1", "--limit-batches", "2"]
    _train(tmp_path, tmp_path / "dump1", outs, [*steps, "--max-steps", "3", "--ckpt-every", "1", "--channels-last"])
    views = _views(tmp_path / "dump1")
    _check_ranks_agree(views)
    _check_shards(views)
    _check_recalibration_and_eval(views)
    written = [o for o in outs if o.exists()]
    assert len(written) == 1, f"--out written on {len(written)} nodes: rank 0 alone writes"
    out = written[0]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl", "supernet.pt"]
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("final") == 1, events

    # Resume on both nodes from the shared --out, in the other memory format.
    nodes = _train(tmp_path, tmp_path / "dump2", [out, out], [*steps, "--no-channels-last"])
    assert any("resumed from" in n.out() for n in nodes), [n.out()[-2000:] for n in nodes]
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["world_size"]) == (4, WORLD)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1 and events[-1]["step"] == 4
    views2 = _views(tmp_path / "dump2")
    _check_ranks_agree(views2)
    trained = [k for k, t in views[0]["model"].items() if not torch.equal(t, views2[0]["model"][k])]
    assert trained, "the resumed run changed no weight"


def test_a_dying_rank_stops_every_node_with_a_clear_message(tmp_path):
    out = tmp_path / "out"
    train = ["-m", "qfa", "train", *TINY, "--out", str(out), "--epochs", "50", "--ckpt-every", "1"]
    nodes = _launch(tmp_path, [train, train])
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (out / "last.pt").exists():  # training is under way on all four ranks
            assert all(n.proc.poll() is None for n in nodes), [n.err()[-3000:] for n in nodes]
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.5)
        workers = [pid for n in nodes for pid in n.workers()]
        victim = nodes[1].workers()
        assert len(victim) == PER_NODE and len(workers) == WORLD, workers
        os.kill(victim[-1], signal.SIGKILL)
        codes = _wait(nodes, 120)  # gloo sees the closed sockets at once; far below the collectives' timeout
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
    assert all(code != 0 for code in codes), codes
    survivor = nodes[0].err()
    # Each survivor either reports the lost peer itself or, once its sibling has, is stopped by torchrun.
    clear = re.findall(r"^qfa train: error: rank \d of 4: another process of the run stopped", survivor, re.MULTILINE)
    assert clear, survivor[-4000:]
    assert not re.search(r"^\[rank\d\]: Traceback", survivor, re.MULTILINE), survivor[-4000:]
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived their launcher"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
