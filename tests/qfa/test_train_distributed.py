"""Data-parallel training: two gloo processes on the CPU end with identical weights; the DDP
gradient sync after the last subnet equals one process on the concatenated batch."""

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
        assert isinstance(trainer.net, torch.nn.parallel.DistributedDataParallel) and trainer.net.module is model
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


class _Elastic(torch.nn.Module):
    """Three "subnets" that use different parameters: ``a`` only in subnet 0, ``b`` only in subnet 1
    (the last of the step), ``c`` in both, ``unused`` in none."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c, self.unused = (torch.nn.Linear(4, 3) for _ in range(4))
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g))
        self.active = 0

    def forward(self, x):
        first = self.a(x) if self.active == 0 else self.b(x).tanh()
        return first + self.c(x)


def _elastic_step(net, model, x, y) -> None:
    for i, active in enumerate((0, 1)):
        model.active = active
        with distributed.sync_unless(net, accumulate=i == 0):
            torch.nn.functional.mse_loss(net(x), y).backward()


def _elastic_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * 6, 4, generator=g), torch.randn(2 * 6, 3, generator=g)


def _elastic_rank(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    try:
        model = _Elastic()
        net = distributed.wrap_ddp(model, ctx)
        x, y = _elastic_data()
        for _ in range(2):  # the second step: DDP's state after a step with no_sync must be right too
            model.zero_grad(set_to_none=True)
            _elastic_step(net, model, x[rank::WORLD], y[rank::WORLD])
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(tmp, f"grad{rank}.pt"))
    finally:
        distributed.teardown()


def test_ddp_syncs_every_subnets_gradients_like_one_process(tmp_path):
    """Parameters used only before the last subnet (under no_sync) are averaged too; unused ones get none."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    model = _Elastic()
    assert distributed.wrap_ddp(model, distributed.DistContext()) is model  # one process: no DDP
    x, y = _elastic_data()
    _elastic_step(model, model, x, y)  # the concatenated batch (mean losses: same as the mean over ranks)
    expected = {n: p.grad for n, p in model.named_parameters()}
    mp.spawn(_elastic_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        grads = torch.load(tmp_path / f"grad{r}.pt", weights_only=True)
        for n, g in expected.items():
            if n.startswith("unused."):
                assert g is None and grads[n] is None, n
            else:
                torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {n}")
