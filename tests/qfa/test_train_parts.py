"""qfa.train building blocks: losses (vs float64), optimiser groups, schedule, options/config files,
step planning, the non-finite guard, gradient bucketing."""

from __future__ import annotations

import argparse
import math
import random

import pytest
import torch
from torch import nn

from qfa.train import distributed, options
from qfa.train.losses import DistillationLoss, soft_cross_entropy
from qfa.train.optim import (
    build_optimizer,
    phased_warmup_cosine,
    split_decay_groups,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)
from qfa.train.step import NonFiniteGuard, NonFiniteLossError, PlannedSubnet, plan_subnets, step_rng


def _logits(n=16, k=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_soft_cross_entropy_matches_float64(temperature):
    s, t = _logits(seed=1).requires_grad_(), _logits(seed=2)
    loss = soft_cross_entropy(s, t, temperature)
    s64, t64 = s.detach().double().requires_grad_(), t.double()
    q = torch.softmax(t64 / temperature, 1)
    ref = -(q * torch.log_softmax(s64 / temperature, 1)).sum(1).mean() * temperature**2
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-8)
    # KD = KL(q || p) + H(q): minimised exactly at the teacher's distribution
    assert soft_cross_entropy(t, t, temperature) < loss


def test_distillation_loss_matches_float64():
    s, t = _logits(seed=3), _logits(seed=4)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(5))
    crit = DistillationLoss(label_smoothing=0.1, kd_ratio=0.7, temperature=1.0)
    s64, t64 = s.double(), t.double()
    logp = torch.log_softmax(s64, 1)
    ce = -(0.9 * logp.gather(1, y[:, None]).squeeze(1) + 0.1 * logp.mean(1)).mean()
    kd = -(torch.softmax(t64, 1) * logp).sum(1).mean()
    torch.testing.assert_close(crit(s, y, t).double(), ce + 0.7 * kd, rtol=1e-6, atol=0)
    torch.testing.assert_close(crit(s, y).double(), ce, rtol=1e-6, atol=0)
    # bf16 logits are promoted: the loss is float32
    assert crit(s.bfloat16(), y, t.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="label_smoothing"):
        DistillationLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(s, t[:, :5])


# ----------------------------------------------------------------------------- optimiser and schedule


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def no_decay_parameters(self):
        return [self.bn.weight, self.bn.bias, self.conv.bias, self.fc.bias]


def test_optimizer_groups():
    net = _Net()
    opt = build_optimizer(net, 0.1, weight_decay=3e-5)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 3e-5 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    assert len(no_decay["params"]) == 4
    assert decay["nesterov"] and decay["momentum"] == 0.9
    assert all(p is not net.frozen for g in opt.param_groups for p in g["params"])
    d, n = split_decay_groups(net, ["bn.weight", "bn.bias"])
    assert len(n) == 2 and len(d) == 4
    with pytest.raises(ValueError, match="not a parameter"):
        split_decay_groups(net, ["nope"])
    # one step: the no-decay group really gets no weight decay
    net2 = _Net()
    opt2 = build_optimizer(net2, 0.1, weight_decay=0.5, momentum=0.0)
    for p in net2.parameters():
        p.grad = torch.zeros_like(p)
    before = net2.bn.weight.clone(), net2.conv.weight.clone()
    opt2.step()
    assert torch.equal(net2.bn.weight, before[0])
    torch.testing.assert_close(net2.conv.weight, before[1] * (1 - 0.1 * 0.5))


def test_warmup_cosine():
    w, total = 10, 110
    f = [warmup_cosine_factor(s, w, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[w - 1] == pytest.approx(1.0) and f[w] == pytest.approx(1.0)
    assert f[w + 50] == pytest.approx(0.5)
    assert all(a <= b for a, b in zip(f[: w - 1], f[1:w], strict=True))
    assert all(a >= b for a, b in zip(f[w:-1], f[w + 1 :], strict=True))
    assert warmup_cosine_factor(total, w, total) == pytest.approx(0.0)
    net = _Net()
    opt = build_optimizer(net, 0.4)
    sched = warmup_cosine_schedule(opt, w, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.4 * v for v in f])
    with pytest.raises(ValueError):
        warmup_cosine_schedule(opt, 20, 10)


def test_phased_schedule_restarts_the_warmup():
    net = _Net()
    opt = build_optimizer(net, 0.1)
    sched = phased_warmup_cosine(opt, [(4, 2, 6.0), (10, 5, 1.0)])
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.6 * warmup_cosine_factor(s, 2, 4) for s in range(4)]
    expected += [0.1 * warmup_cosine_factor(s, 5, 10) for s in range(10)] + [0.0, 0.0]
    assert lrs == pytest.approx(expected)
    assert lrs[4] == pytest.approx(0.1 / 5)  # the second phase starts from its own warmup
    with pytest.raises(ValueError, match="each phase"):
        phased_warmup_cosine(opt, [(4, 5, 1.0)])


# ----------------------------------------------------------------------------- options


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, cls)
    return parser.parse_args(argv)


def test_options_precedence(tmp_path):
    # published defaults when the data is not the demo
    o = options.resolve(options.TrainOptions, _parse(options.TrainOptions, ["--data", "synthetic"]))
    assert (o.width_mult, o.epochs, o.lr, o.bits, o.resolution_list[0]) == (1.2, 60, 2.5e-3, (2, 3, 4, 32), 128)
    assert o.preset == "published"
    # the digits preset by default
    d = options.resolve(options.TrainOptions, _parse(options.TrainOptions, []))
    assert d.preset == "digits" and d.width_mult != 1.2 and d.max_resolution == 32
    # file overrides preset, command line overrides file
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 3\nbits: [2, 3, 4]\nkd-ratio: 0.5\nchannels_last: true\n")
    o = options.resolve(options.TrainOptions, _parse(options.TrainOptions, ["--config", str(cfg), "--epochs", "7"]))
    assert (o.epochs, o.bits, o.kd_ratio, o.channels_last) == (7, (2, 3, 4), 0.5, True)
    toml = tmp_path / "run.toml"
    toml.write_text('data = "synthetic"\nlr = 0.1\nresolutions = "16,24"\n')
    o = options.resolve(options.TrainOptions, _parse(options.TrainOptions, ["--config", str(toml)]))
    assert (o.data, o.lr, o.resolution_list, o.preset) == ("synthetic", 0.1, (16, 24), "published")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['epochz'\\]"):
        options.resolve(options.TrainOptions, _parse(options.TrainOptions, ["--config", str(bad)]))
    with pytest.raises(ValueError, match="--epochs"):
        options.resolve(options.TrainOptions, {"epochs": 0})
    with pytest.raises(SystemExit):
        _parse(options.TrainOptions, ["--amp", "fp8"])
    with pytest.raises(ValueError, match="--bits"):
        options.convert("bits", "2,x", options._hints(options.TrainOptions)["bits"])


def test_help_documents_published_and_demo_defaults():
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, options.TrainOptions)
    text = " ".join(parser.format_help().split())
    assert "(default: 0.0025; digits preset: 0.08)" in text
    assert "(default: 128:224:4; digits preset: 24:32:4)" in text
    assert "(default: 2,3,4,32)" in text and "(default: 500.0)" in text


# ----------------------------------------------------------------------------- step planning and guard


class _FakeSupernet:
    """Records the sampling calls of plan_subnets (the real supernet is tested in test_train_trainer)."""

    def __init__(self):
        from qfa import SearchSpace

        self.space = SearchSpace(bits_list=(2, 3, 4, 32))

    def set_sandwich_subnet(self, kind, rng):
        return self.space.sandwich(kind, rng)

    def sample_active_subnet(self, rng):
        return self.space.sample(rng)


def test_plan_subnets_is_seeded_by_step():
    net = _FakeSupernet()
    res = tuple(range(128, 225, 4))
    a = plan_subnets(net, step_rng(0, 7), 6, res)
    b = plan_subnets(net, step_rng(0, 7), 6, res)
    c = plan_subnets(net, step_rng(0, 8), 6, res)
    assert [p.kind for p in a] == ["min", "max"] + ["random"] * 4
    assert [p.config for p in a] == [p.config for p in b]  # every rank, and after a resume
    assert [p.config for p in a] != [p.config for p in c]
    assert a[0].config.resolution == 128 and a[1].config.resolution == 224
    assert all(p.config.resolution in res for p in a)
    assert max(a[1].config.e) == 6 and max(a[0].config.e) == 3
    assert [p.kind for p in plan_subnets(net, random.Random(0), 1, res)] == ["max"]


def test_non_finite_guard_names_step_and_subnet():
    net = _FakeSupernet()
    plan = plan_subnets(net, step_rng(0, 3), 4, (16, 24))
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.push(3, plan, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(5.0))
    guard.push(4, plan, torch.tensor([1.0, 2.0, math.nan, 4.0]), torch.tensor(5.0))  # checks step 3: fine
    assert guard.drain() == [(3, [1.0, 2.0, 3.0, 4.0], 5.0)]
    with pytest.raises(NonFiniteLossError, match=r"step 4 in subnet 3/4: random subnet at \d+ px") as err:
        guard.flush()
    assert '"ks":' in str(err.value)  # the full config, as JSON
    guard.push(5, plan, torch.ones(4), torch.tensor(math.inf))
    with pytest.raises(NonFiniteLossError, match="gradient norm .* step 5"):
        guard.flush()
    assert isinstance(plan[0], PlannedSubnet)


def test_non_finite_guard_reads_the_stop_vote_with_the_losses():
    """The ranks' Ctrl-C vote turns ``stop_voted`` on when its step is checked (one step late, no sync),
    and stays on; the losses and gradient norm read back are unchanged by it."""
    plan = plan_subnets(_FakeSupernet(), step_rng(0, 3), 2, (16, 24))
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.push(0, plan, torch.tensor([1.0, 2.0]), torch.tensor(3.0), torch.zeros(1))
    guard.push(1, plan, torch.tensor([4.0, 5.0]), torch.tensor(6.0), torch.full((1,), 0.5))  # 1 of 2 ranks
    assert not guard.stop_voted  # step 1 is not checked yet
    guard.push(2, plan, torch.tensor([7.0, 8.0]), None, torch.zeros(1))
    assert guard.stop_voted
    guard.flush()
    assert guard.stop_voted and guard.drain() == [(0, [1.0, 2.0], 3.0), (1, [4.0, 5.0], 6.0), (2, [7.0, 8.0], 0.0)]


# ----------------------------------------------------------------------------- gradient buckets


def test_buckets_keep_order_and_split_by_dtype():
    ts = [torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(30), torch.zeros(5)]
    buckets = distributed._buckets(ts, bucket_bytes=100)
    assert [[t.numel() for t in b] for b in buckets] == [[10], [30], [5], [3]]
    assert all(len({t.dtype for t in b}) == 1 for b in buckets)
    ctx = distributed.DistContext()
    assert not ctx.distributed and ctx.is_main
    distributed.all_reduce_mean(ts, 1)  # single process: a no-op
