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


def test_no_forward_buffer_sync_names_the_argument_this_torch_has():
    class Torch211DDP:  # the DDP signature up to torch 2.11
        def __init__(self, module, device_ids=None, broadcast_buffers=True, find_unused_parameters=False): ...

    class Torch214DDP:
        def __init__(self, module, broadcast_buffers=None, init_sync=True, forward_sync_buffers=None): ...

    assert distributed.no_forward_buffer_sync(Torch211DDP) == {"broadcast_buffers": False}
    assert distributed.no_forward_buffer_sync(Torch214DDP) == {"forward_sync_buffers": False}
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    (name,) = distributed.no_forward_buffer_sync(DistributedDataParallel)
    assert name in inspect.signature(DistributedDataParallel.__init__).parameters


def test_match_grad_strides_gives_channels_last_weights_their_own_strides(one_thread):
    """The weights with a size-1 dimension (depthwise [C,1,k,k], pointwise [O,I,1,1]) get gradients with
    contiguous strides from the weight slicing's backward; DDP's buckets use the parameter's strides."""
    from test_train_trainer import TINY

    from qfa.train.step import plan_subnets, step_rng
    from qfa.train.trainer import build_supernet

    def mismatched(model) -> list[str]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same inputs and dropout masks in both passes
        for sub in plan_subnets(model, step_rng(0, 0), 3, opts.resolution_list):
            model.set_active_config(sub.config)
            x = torch.randn(2, 3, sub.config.resolution, sub.config.resolution)
            model(x.contiguous(memory_format=torch.channels_last)).logsumexp(1).mean().backward()
        return [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]

    opts = options.resolve(options.TrainOptions, {**TINY, "out": "unused"})
    torch.manual_seed(0)
    model = build_supernet(opts, 10).to(memory_format=torch.channels_last)
    before = mismatched(model)
    assert any(n.endswith("depth_conv.weight") for n in before), "no mismatch to fix: the test would prove nothing"
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    distributed.match_grad_strides(model)
    assert mismatched(model) == []
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)  # same values, only relabelled


def test_describe_peer_failure_only_for_lost_ranks():
    two = distributed.DistContext(rank=1, world_size=2)
    lost = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:5")
    message = distributed.describe_peer_failure(lost, two)
    assert message.startswith("rank 1 of 2: another process of the run stopped") and "Connection closed" in message
    assert distributed.describe_peer_failure(lost, distributed.DistContext()) is None  # one process: no peers
    store_lost = torch.distributed.DistNetworkError("failed to recv, got 0 bytes")  # rank 0's node (the store) gone
    assert distributed.describe_peer_failure(store_lost, two).startswith("rank 1 of 2: another process")
    bug = RuntimeError("[/pytorch/third_party/gloo/gloo/allreduce.cc:140] mismatched sizes")  # keeps its traceback
    assert distributed.describe_peer_failure(bug, two) is None
    assert distributed.describe_peer_failure(ValueError("Connection reset by peer"), two) is None


def _resume_rank(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    from qfa.train import ckpt

    ctx = distributed.setup("cpu")
    results = {}
    try:
        own = os.path.join(tmp, f"node{rank}")  # rank 0's directory has a checkpoint, rank 1's has none
        shared = os.path.join(tmp, "node0")
        for name, resume, out in [("shared", "auto", shared), ("own", "auto", own), ("missing", "gone.pt", shared)]:
            try:
                results[name] = str(ckpt.resolve_resume_on_all_ranks(resume, out, ctx))
            except ckpt.CheckpointError as err:
                results[name] = f"CheckpointError: {err}"
    finally:
        distributed.teardown()
    torch.save(results, os.path.join(tmp, f"resume{rank}.pt"))


def test_ranks_agree_on_the_checkpoint_to_resume_from(tmp_path):
    """A node that cannot see rank 0's --out must not start afresh while the others resume (they would
    wait for each other forever): every rank raises the same error instead."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "last.pt").write_bytes(b"")
    mp.spawn(_resume_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"resume{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["shared"] == r1["shared"] == str(tmp_path / "node0" / "last.pt")
    assert r0["own"] == r1["own"]
    assert r0["own"].startswith("CheckpointError: --resume auto: the ranks found different checkpoints")
    assert "rank 1: none" in r0["own"] and "shared filesystem" in r0["own"]
    assert r0["missing"] == r1["missing"] == "CheckpointError: ranks 0, 1: --resume 'gone.pt': no such checkpoint file"
