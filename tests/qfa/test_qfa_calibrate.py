"""qfa.calibrate / qfa.evaluate / qfa.evaluate_subnet against hand-computed values."""

from __future__ import annotations

import copy
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import qfa
from bquant_kernels import BatchQuantizer
from qfa import QFAMobileNetV3
from qfa.nn import DynamicBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(dropout: float = 0.0) -> QFAMobileNetV3:
    torch.manual_seed(0)
    model = QFAMobileNetV3(n_classes=7, width_mult=0.25, dropout=dropout)
    model.set_active_subnet(ks=[3, 5, 7, 5] * 5, e=[3, 4, 6, 3] * 5, d=[2, 3, 2, 4, 3], w_bits=3, a_bits=4)
    return model


def _loader(sizes=(5, 3, 7), res: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, res, res, generator=gen) * 2 + 0.5, torch.randint(0, 7, (n,), generator=gen)) for n in sizes
    ]


def _expected_stats(model: QFAMobileNetV3, loader) -> tuple[dict, dict]:
    """Hand-computed weighted means of per-batch BN mean / biased var and BatchQuant (lo, hi), float64."""
    bn_in: dict[DynamicBatchNorm2d, list] = {}
    bq_in: dict[BatchQuantizer, list] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, DynamicBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, a: bn_in.setdefault(mod, []).append(a[0].double())))
        elif isinstance(m, BatchQuantizer):
            hooks.append(m.register_forward_pre_hook(lambda mod, a: bq_in.setdefault(mod, []).append(a[0].double())))
    model.train()  # batch statistics everywhere (dropout is 0)
    fused, model.fused_epilogue = model.fused_epilogue, False  # the hooks need the modules called one by one
    with torch.no_grad():
        for images, _ in loader:
            model(images)
    model.fused_epilogue = fused
    for h in hooks:
        h.remove()
    bn = {}
    for m, xs in bn_in.items():
        n = sum(x.shape[0] for x in xs)
        mean = sum(x.mean((0, 2, 3)) * x.shape[0] for x in xs) / n
        var = sum(x.var((0, 2, 3), unbiased=False) * x.shape[0] for x in xs) / n
        bn[m] = (mean, var)
    bq = {}
    for m, xs in bq_in.items():
        n = sum(x.shape[0] for x in xs)
        rows = []
        for x in xs:
            dims = [d for d in range(x.dim()) if d != 1]
            rows.append(torch.stack([x.amin(dims).mean(), x.amax(dims).mean()]) * x.shape[0])
        bq[m] = sum(rows) / n
    return bn, bq


def test_calibration_matches_hand_computed_means():
    model = _tiny()
    loader = _loader()
    model.train()(loader[0][0])  # initialise the active LSQ steps
    before = copy.deepcopy(model.state_dict())
    # a training-mode pass uses batch statistics and changes no state (no EMA), so the reference
    # statistics can be taken on the model itself, keyed by module
    bn_ref, bq_ref = _expected_stats(model, loader)
    param_ids = [id(p) for p in model.parameters()]
    out = qfa.calibrate(model, loader, num_batches=10)
    assert out is model and not model.training
    assert [id(p) for p in model.parameters()] == param_ids  # in place, no copy
    bns = {n: m for n, m in model.named_modules() if isinstance(m, DynamicBatchNorm2d)}
    assert 0 < len(bn_ref) < len(bns)  # some BN layers are inactive
    for name, m in bns.items():
        if m in bn_ref:
            mean, var = bn_ref[m]
            c = mean.numel()
            torch.testing.assert_close(m.running_mean[:c].double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.running_var[:c].double(), var, rtol=1e-5, atol=1e-6)
            # channels beyond the active width are untouched
            assert torch.equal(m.running_mean[c:], before[f"{name}.running_mean"][c:])
            assert torch.equal(m.running_var[c:], before[f"{name}.running_var"][c:])
        else:
            assert torch.equal(m.running_mean, before[f"{name}.running_mean"]), name
            assert torch.equal(m.running_var, before[f"{name}.running_var"]), name
    bqs = {n: m for n, m in model.named_modules() if isinstance(m, BatchQuantizer)}
    assert 0 < len(bq_ref) < len(bqs)
    for name, m in bqs.items():
        if m in bq_ref:
            torch.testing.assert_close(m.lo_hi.double(), bq_ref[m], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(m.lo_hi, before[f"{name}.lo_hi"]), name


def test_num_batches_resolution_and_errors():
    model = _tiny()
    big = _loader(sizes=(4, 4, 4), res=40)
    small = [(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True), y) for x, y in big]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    qfa.calibrate(a, big, num_batches=2, resolution=32)
    qfa.calibrate(b, small[:2], num_batches=30)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.allclose(va.float(), vb.float(), rtol=1e-6, atol=1e-7), ka
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        qfa.calibrate(model, big, num_batches=0)
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        qfa.calibrate(model, big, resolution=-3)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        qfa.calibrate(model, [])
    assert all(m.stats_sink is None for m in model.modules() if isinstance(m, DynamicBatchNorm2d))


def test_evaluate_matches_manual_metrics():
    model = _tiny()
    loader = _loader(sizes=(6, 9))
    qfa.calibrate(model, loader)
    res = qfa.evaluate(model, loader)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    top5 = logits.topk(5, 1).indices
    assert res["n"] == 15
    assert res["top1"] == pytest.approx(100 * (top5[:, 0] == labels).double().mean().item())
    assert res["top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).double().mean().item())
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_evaluate_subnet_sets_calibrates_and_evaluates_at_resolution():
    model = _tiny()
    cfg = model.space.sample(random.Random(3))
    cfg.resolution = 36
    calib, val = _loader(res=40), _loader(sizes=(4, 4), res=48, seed=9)
    ref_model = copy.deepcopy(model)
    got = qfa.evaluate_subnet(model, cfg, calib, val, num_calib_batches=2)
    ref_model.set_active_config(cfg)
    qfa.calibrate(ref_model, calib, num_batches=2, resolution=36)
    ref = qfa.evaluate(ref_model, val, resolution=36)
    assert model.get_active_config().ks == cfg.ks
    assert got == pytest.approx(ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _tiny()
        loader = _loader(sizes=(4, 4), seed=10 + rank)  # each rank its own shard
        qfa.calibrate(model, loader)
        if rank == 0:
            torch.save({k: v for k, v in model.state_dict().items()}, result_path)
    finally:
        dist.destroy_process_group()


def test_distributed_calibration_averages_per_rank_means(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(_free_port(), path), nprocs=2, join=True)
    got = torch.load(path)
    per_rank = []
    for rank in range(2):
        m = _tiny()
        qfa.calibrate(m, _loader(sizes=(4, 4), seed=10 + rank))
        per_rank.append(m.state_dict())
    for key, value in got.items():
        if key.endswith(("running_mean", "running_var", "lo_hi")):
            expected = (per_rank[0][key].double() + per_rank[1][key].double()) / 2
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=key)
