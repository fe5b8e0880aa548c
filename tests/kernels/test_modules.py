"""BatchQuantizer / LSQQuantizer modules and recalibration (spec 2, 3)."""

from __future__ import annotations

import math
import os

import pytest
import spec_oracle as oracle
import torch
import torch.distributed as dist
from helpers import make_activation

import bquant_kernels as bk


def test_batchquantizer_train_uses_batch_stats_and_eval_uses_lo_hi():
    q = bk.BatchQuantizer(3)
    x = make_activation((4, 5, 6, 6)).float()
    torch.testing.assert_close(q(x), bk.batchquant(x, q.theta, q.offset, 3))
    q.eval()
    q.set_range(torch.tensor([-0.5, 0.75]))
    torch.testing.assert_close(q(x), bk.batchquant(x, q.theta, q.offset, 3, lo_hi=torch.tensor([-0.5, 0.75])))
    assert not torch.equal(q(x), bk.batchquant(x, q.theta, q.offset, 3))


def test_batchquantizer_training_never_updates_lo_hi():
    q = bk.BatchQuantizer(4)
    before = q.lo_hi.clone()
    q(make_activation((2, 3, 4, 4)).float())
    assert torch.equal(q.lo_hi, before), "running range is set only by recalibration, never an EMA"


def test_bits_out_of_range_in_modules():
    with pytest.raises(ValueError, match="bits"):
        bk.BatchQuantizer(1)
    with pytest.raises(ValueError, match="bits"):
        bk.LSQQuantizer(9)


def test_lsq_init_from_full_weight_and_gradient_scale_of_full_weight():
    q = bk.LSQQuantizer(4)
    w_full = torch.randn(16, 8, 3, 3)
    w = w_full[:10]  # an active slice
    w_hat = q(w, w_full=w_full)
    expected = 2 * w_full.abs().mean() / math.sqrt(7)
    torch.testing.assert_close(q.step.detach(), expected.reshape(1))
    assert bool(q.initialized)
    torch.testing.assert_close(w_hat, bk.lsq(w, q.step, 4, numel_full=w_full.numel()))
    # slicing before or after quantization gives the same numbers (spec 2)
    torch.testing.assert_close(w_hat, bk.lsq(w_full, q.step, 4)[:10])


def test_lsq_gradient_of_slice_uses_full_numel():
    s = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    w_full = torch.randn(12, 7, dtype=torch.float64)
    w = w_full[:5].clone().requires_grad_(True)
    g = torch.randn_like(w)
    bk.lsq(w, s, 3, numel_full=w_full.numel()).backward(g)
    ref = oracle.lsq(w.detach().numpy(), g.numpy(), 0.05, 3, numel_full=w_full.numel())
    assert math.isclose(float(s.grad), ref.grad_step, rel_tol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_lsq_quantize_weights_is_the_per_quantizer_calls(backend):
    """Grouped by (backend, signed): forward and weight gradients bit for bit, steps initialised on
    first use from the full weight, step gradients up to float32 summation order."""
    ok, why = bk.backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    gen = torch.Generator().manual_seed(11)
    fulls = [
        torch.randn(8, 6, 3, 3, generator=gen) * 0.1,
        torch.randn(40, 7, generator=gen),
        torch.randn(33, generator=gen),
    ]
    slices = [fulls[0][:5], fulls[1], fulls[2][:20]]
    specs = [(4, True), (2, False), (3, True)]  # two groups: signed and unsigned
    upstream = [torch.randn(w.shape, generator=gen) for w in slices]
    runs = []
    for grouped in (True, False):
        qs = [bk.LSQQuantizer(b, signed=sg, backend=backend) for b, sg in specs]
        params = [f.clone().requires_grad_() for f in fulls]
        ws = [params[0][:5], params[1], params[2][:20]]
        if grouped:
            outs = bk.lsq_quantize_weights(qs, ws, params)
        else:
            outs = [q(w, w_full=p) for q, w, p in zip(qs, ws, params, strict=True)]
        assert all(bool(q.initialized) for q in qs)
        torch.autograd.backward(outs, upstream)
        runs.append((outs, [p.grad for p in params], [q.step.detach().clone() for q in qs], [q.step.grad for q in qs]))
    (outs, gws, steps, gss), (outs_ref, gws_ref, steps_ref, gss_ref) = runs
    for a, b in zip(outs + gws + steps, outs_ref + gws_ref + steps_ref, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(gss, gss_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one entry each"):
        bk.lsq_quantize_weights(qs, slices[:2], fulls)


def test_state_dict_round_trip_never_reinitialises():
    q = bk.LSQQuantizer(3)
    q(torch.randn(4, 4))
    with torch.no_grad():
        q.step.fill_(0.123)  # e.g. trained
    state = q.state_dict()
    assert set(state) == {"step", "initialized"} and bool(state["initialized"])
    fresh = bk.LSQQuantizer(3)
    fresh.load_state_dict(state)
    fresh(torch.randn(4, 4) * 100)  # would re-initialise if the flag were lost
    assert float(fresh.step.detach()) == pytest.approx(0.123)

    a = bk.BatchQuantizer(2)
    with torch.no_grad():
        a.theta.fill_(0.5), a.offset.fill_(-0.25), a.lo_hi.copy_(torch.tensor([-1.0, 2.0]))
    b = bk.BatchQuantizer(2)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"theta", "offset", "lo_hi"}
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


class _TwoQuant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = bk.BatchQuantizer(4)
        self.b = bk.BatchQuantizer(4)
        self.unused = bk.BatchQuantizer(4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * 2.0)


def test_recalibration_is_batch_size_weighted_mean():
    model = _TwoQuant().eval()
    batches = [make_activation((n, 3, 4, 4), seed=n).float() for n in (2, 5, 3)]
    with torch.no_grad(), bk.recalibrate(model):
        for x in batches:
            model(x)
    # hand-computed: per-batch [lo, hi] of each quantizer's input, weighted by batch size
    total = sum(x.shape[0] for x in batches)
    exp_a = (
        sum(torch.tensor(oracle.channel_range(x.double().numpy()), dtype=torch.float64) * x.shape[0] for x in batches)
        / total
    )
    with torch.no_grad():
        inputs_b = [torch.relu(bk.batchquant(x, model.a.theta, model.a.offset, 4)) * 2.0 for x in batches]
    exp_b = (
        sum(torch.tensor(oracle.channel_range(x.double().numpy()), dtype=torch.float64) * x.shape[0] for x in inputs_b)
        / total
    )
    torch.testing.assert_close(model.a.lo_hi.double(), exp_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.b.lo_hi.double(), exp_b, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.unused.lo_hi, torch.zeros(2)), "inactive quantizers keep their values"
    assert all(q.range_sink is None for q in (model.a, model.b, model.unused))


def test_recalibration_writes_nothing_on_error():
    model = _TwoQuant().eval()
    with pytest.raises(RuntimeError, match="boom"), bk.recalibrate(model):
        model(make_activation((2, 3, 4, 4)).float())
        raise RuntimeError("boom")
    assert torch.equal(model.a.lo_hi, torch.zeros(2))
    assert model.a.range_sink is None


def test_recalibration_under_distributed_single_rank(tmp_path):
    """The all-reduce path (gloo, world size 1): same result as without distributed."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        m1, m2 = _TwoQuant().eval(), _TwoQuant().eval()
        x = make_activation((3, 3, 4, 4)).float()
        with torch.no_grad(), bk.recalibrate(m1):
            m1(x)
    finally:
        dist.destroy_process_group()
    with torch.no_grad(), bk.recalibrate(m2):
        m2(x)
    assert torch.equal(m1.a.lo_hi, m2.a.lo_hi) and torch.equal(m1.b.lo_hi, m2.b.lo_hi)
