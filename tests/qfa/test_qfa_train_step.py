"""A supernet training step (sandwich + random subnets, summed gradients) on the CPU with no host sync."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from bquant_kernels import BatchQuantizer, LSQQuantizer
from qfa import QFAMobileNetV3
from qfa.nn import DynamicBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_host_sync(monkeypatch) -> None:
    """Make every tensor -> Python conversion raise, as a device sync would on a GPU."""

    def forbidden(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called in the training step")

        return raiser

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))


def _optimizer(model: QFAMobileNetV3) -> torch.optim.Optimizer:
    no_decay = {id(p) for p in model.no_decay_parameters()}
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    rest = [p for p in model.parameters() if id(p) in no_decay]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 3e-5}, {"params": rest, "weight_decay": 0.0}],
        lr=0.01,
        momentum=0.9,
        nesterov=True,
    )


def test_no_decay_parameters():
    model = QFAMobileNetV3(n_classes=10, width_mult=0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in model.no_decay_parameters()}
    for n in names.values():
        expected = ".bn." in n or n.endswith(".bias") or n.endswith((".step", ".theta", ".offset"))
        assert (n in got) == expected, n
    assert "classifier.bias" in got and "blocks.5.conv.depth_conv.se.reduce.bias" in got
    assert "blocks.5.conv.depth_conv.weight" not in got


def test_supernet_training_step_without_host_sync(monkeypatch):
    torch.manual_seed(0)
    model = QFAMobileNetV3(n_classes=10, width_mult=0.25, bits_list=(2, 3, 4, 32))
    opt = _optimizer(model)
    rng = random.Random(0)  # seeded identically on every rank: same subnets everywhere
    images = torch.randn(4, 3, 48, 48)
    labels = torch.randint(0, 10, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    _no_host_sync(monkeypatch)
    for _step in range(2):
        opt.zero_grad(set_to_none=True)
        configs = [model.set_sandwich_subnet("max", rng), model.set_sandwich_subnet("min", rng)]
        sizes = [48, 32]
        for _ in range(2):
            configs.append(model.sample_active_subnet(rng))
            sizes.append(rng.choice((32, 40, 48)))
        for cfg, res in zip(configs, sizes, strict=True):
            model.set_active_config(cfg)
            x = F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(model(x), labels, label_smoothing=0.1)
            loss.backward()  # gradients summed over the subnets
        torch.nn.utils.clip_grad_norm_(model.parameters(), 500.0)
        opt.step()
    monkeypatch.undo()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith(".step") for n in changed) and any(n.endswith(".theta") for n in changed)
    assert "blocks.1.conv.inverted_bottleneck.weight" in changed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # BN running statistics are never touched by training (no EMA)
    for m in model.modules():
        if isinstance(m, DynamicBatchNorm2d):
            assert not m.running_mean.any() and torch.equal(m.running_var, torch.ones_like(m.running_var))
        if isinstance(m, BatchQuantizer):
            assert not m.lo_hi.any()


def test_only_active_quantizers_get_gradients():
    torch.manual_seed(1)
    model = QFAMobileNetV3(n_classes=10, width_mult=0.25)
    model.set_active_subnet(ks=5, e=4, d=2, w_bits=3, a_bits=2)
    model.train()
    model(torch.randn(3, 3, 32, 32)).square().sum().backward()
    n_with_grad = 0
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer):
            bank, bits = name.rsplit(".", 1)
            active_ks = ".3" if bank.startswith("blocks.0.") else ".5"  # block 0 is fixed at 3x3
            active_bits = "8" if bank.startswith("classifier") else "3"  # the classifier is raised to 8
            used = bits == active_bits and (".w_quantizers." not in bank or bank.endswith(active_ks))
            used = used and not name.startswith("first_conv")  # the stem stays full precision
            inactive_block = any(name.startswith(f"blocks.{b + 1}.") for b in range(20) if b % 4 >= 2)
            has_grad = m.step.grad is not None and bool(m.step.grad.abs().sum() > 0)
            assert has_grad == (used and not inactive_block), name
            n_with_grad += has_grad
    assert n_with_grad == 2 + 3 * 10 + 3  # block 0, 10 active blocks, head


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_weight_quantization_is_the_per_layer_path(seed):
    """The supernet quantizes its active weights in one multi-tensor op: the same logits and
    gradients as one op per layer (LSQ steps up to float32 summation order), and nothing left set."""
    import copy

    torch.manual_seed(seed)
    grouped = QFAMobileNetV3(n_classes=10, width_mult=0.25, bits_list=(2, 3, 4, 32))
    per_layer = copy.deepcopy(grouped)
    per_layer.group_weight_quantization = False
    images = torch.randn(3, 3, 40, 40)
    logits = []
    for model in (grouped, per_layer):
        model.train()
        model.sample_active_subnet(random.Random(seed))
        torch.manual_seed(100)  # the same dropout mask
        logits.append(model(images))
        logits[-1].square().sum().backward()
    assert torch.equal(logits[0], logits[1])
    steps = 0
    for (name, p), (_, q) in zip(grouped.named_parameters(), per_layer.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        if name.endswith(".step"):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)
            steps += 1
        else:
            assert torch.equal(p.grad, q.grad), name
    assert steps > 10
    layers = [m for m in grouped.modules() if hasattr(m, "weight_for_quantization")]
    assert all(m._w_quantized is None for m in layers)

    def fail(_module, _inputs):
        active = grouped._active_qlayers
        assert all(m._w_quantized is not None for m in active if m.weight_for_quantization() is not None)
        raise RuntimeError("a layer failed")

    handle = grouped.classifier.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="a layer failed"):
        grouped(images)
    handle.remove()
    assert all(m._w_quantized is None for m in layers), "released when a layer fails too"
