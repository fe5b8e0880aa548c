"""Data-parallel training: two gloo processes on the CPU end with identical weights."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from qfa.train import distributed, options

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, tmp: str, settings: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from qfa.train.trainer import Trainer, build_supernet

    ctx = distributed.setup("cpu")
    try:
        opts = options.resolve(options.TrainOptions, {**settings, "out": os.path.join(tmp, "run")})
        torch.manual_seed(100 + rank)  # different initial weights per rank: the trainer must broadcast rank 0's
        model = build_supernet(opts, 10)
        trainer = Trainer(opts, ctx, model=model, log=lambda s: None)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit()
        torch.save(
            {"initial": initial, "final": trainer.model.state_dict(), "batches": trainer.steps_per_epoch},
            os.path.join(tmp, f"rank{rank}.pt"),
        )
    finally:
        distributed.teardown()


def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    from test_train_trainer import TINY

    settings = {**TINY, "limit_batches": 2, "deterministic": False, "ckpt_every": 0}
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), settings), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for k, v in r0["initial"].items():
        assert torch.equal(v, r1["initial"][k]), f"initial {k}: rank 0's weights were not broadcast"
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), f"final {k} differs between the ranks"
    changed = [k for k, v in r0["final"].items() if k.endswith(".weight") and not torch.equal(v, r0["initial"][k])]
    assert changed, "no weight changed: nothing was trained"
    assert (tmp_path / "run" / "supernet.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
