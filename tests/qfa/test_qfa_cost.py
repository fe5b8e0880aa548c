"""qfa.cost: exact against a direct count on the built subnet, and fast on many configs."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from bquant_kernels import BatchQuantizer, LSQQuantizer
from qfa import QFAMobileNetV3, SearchSpace, SubnetConfig
from qfa.cost import CostModel
from qfa.nn import DynamicSE, QConv2d, QLinear

pytestmark = pytest.mark.usefixtures("one_thread")


class _DirectCount(TorchFunctionMode):
    """Counts MACs of every conv2d / linear call, weighted by the bits of the enclosing layer."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.bitops = 0
        self.bits: list[int] = []  # stack of min(w,8)*min(a,8) of the enclosing QConv2d / QLinear / SE

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("conv2d", "linear"):
            w = args[1]
            per_out = int(np.prod(w.shape[1:]))  # (C_in / groups) * kh * kw, or in_features
            macs = out.numel() // out.shape[0] * per_out
            self.macs += macs
            self.bitops += macs * self.bits[-1]
        return out


def _direct_count(net: torch.nn.Module, resolution: int) -> tuple[int, int, int]:
    counter = _DirectCount()
    hooks = []

    def pop(*_args) -> None:  # a forward hook must return None (else it replaces the output)
        counter.bits.pop()

    for m in net.modules():
        if isinstance(m, (QConv2d, QLinear)):
            product = min(m.w_bits, 8) * min(m.a_bits, 8)
            hooks.append(m.register_forward_pre_hook(lambda mod, a, p=product: counter.bits.append(p)))
            hooks.append(m.register_forward_hook(pop))
        elif isinstance(m, DynamicSE):  # full precision: 8 x 8
            hooks.append(m.register_forward_pre_hook(lambda mod, a: counter.bits.append(64)))
            hooks.append(m.register_forward_hook(pop))
    net.eval()
    for m in net.modules():  # values do not matter here, only the operations counted
        if isinstance(m, BatchQuantizer):
            m.set_range(torch.tensor([0.0, 1.0]))
    with torch.no_grad(), counter:
        net(torch.randn(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    quantizer_params = {
        id(p) for m in net.modules() if isinstance(m, (BatchQuantizer, LSQQuantizer)) for p in m.parameters()
    }
    params = sum(p.numel() for p in net.parameters() if id(p) not in quantizer_params)
    return counter.macs, counter.bitops, params


@pytest.mark.parametrize(
    "kwargs, resolutions",
    [
        ({"n_classes": 10, "width_mult": 0.25, "bits_list": (2, 3, 4, 32)}, (32, 45, 57)),
        ({}, (64,)),  # the published supernet
    ],
)
def test_cost_model_is_exact(kwargs, resolutions):
    model = QFAMobileNetV3(**kwargs)
    cost = CostModel(model)
    rng = random.Random(0)
    configs = [model.space.sandwich("min", rng), model.space.sandwich("max", rng), model.space.sample(rng)]
    configs = configs[:2] if not kwargs else configs
    for cfg in configs:
        model.set_active_config(cfg)
        net = model.get_active_subnet()
        for res in resolutions:
            cfg.resolution = res
            macs, bitops, params = _direct_count(net, res)
            assert cost.macs(cfg) == macs
            assert cost.bitops(cfg) == bitops
            assert cost.lut_flops(cfg) == bitops / 64
            assert cost.params(cfg) == params


def test_batch_equals_single_and_space_equals_model():
    model = QFAMobileNetV3(n_classes=10, width_mult=0.25)
    by_model, by_space = CostModel(model), CostModel(model.space, n_classes=10)
    rng = random.Random(1)
    configs = [model.space.sample(rng) for _ in range(20)]
    for c in configs:
        c.resolution = rng.choice((32, 40, 64, 224))
    batch = by_model.evaluate_batch(configs)
    again = by_space.evaluate_batch(by_space.to_arrays(configs))
    for key in ("macs", "params", "bitops", "lut_flops"):
        np.testing.assert_array_equal(batch[key], again[key])
        assert batch[key].shape == (20,)
    for i, c in enumerate(configs):
        assert batch["macs"][i] == by_model.macs(c) and batch["lut_flops"][i] == by_model.lut_flops(c)
    # lower bit-widths never cost more; 32 bits costs like 8; the default resolution is 224
    c = configs[0]
    low = SubnetConfig(c.ks, c.e, c.d, [2] * 64 + [8], [2] * 64 + [8])
    high = SubnetConfig(c.ks, c.e, c.d, [4] * 64 + [8], [4] * 64 + [8])
    fp = SubnetConfig(c.ks, c.e, c.d, [32] * 65, [32] * 65)
    assert by_model.lut_flops(low) < by_model.lut_flops(high) < by_model.lut_flops(fp) == by_model.macs(fp)
    assert by_model.macs(low) == by_model.evaluate_batch({**by_model.to_arrays([low]), "resolution": 224})["macs"][0]


def test_hundred_thousand_configs_in_seconds():
    space = SearchSpace()
    cost = CostModel(space, n_classes=1000)
    n = 100_000
    gen = np.random.default_rng(0)
    arrays = {
        "ks": gen.choice(space.ks_list, (n, space.n_blocks)),
        "e": gen.choice(space.expand_list, (n, space.n_blocks)),
        "d": gen.choice(space.depth_list, (n, space.n_stages)),
        "w_bits": gen.choice(space.bits_list, (n, space.n_qlayers)),
        "a_bits": gen.choice(space.bits_list, (n, space.n_qlayers)),
        "resolution": gen.choice(space.resolutions, n),
    }
    start = time.perf_counter()
    out = cost.evaluate_batch(arrays)
    elapsed = time.perf_counter() - start
    assert out["lut_flops"].shape == (n,) and np.all(out["lut_flops"] > 0)
    # ~1.5 s on an idle 2-core machine; the bound only catches a fall back to per-config Python loops
    # (minutes), with headroom for a loaded CI machine. Real timings belong in benchmarks.
    assert elapsed < 30.0, f"{n} configs took {elapsed:.2f} s"
    # spot check against single evaluation
    i = 12345
    cfg = SubnetConfig(*(arrays[k][i].tolist() for k in ("ks", "e", "d", "w_bits", "a_bits")))
    cfg.resolution = int(arrays["resolution"][i])
    assert cost.bitops(cfg) == out["bitops"][i]


def test_bad_arrays_are_rejected():
    space = SearchSpace()
    cost = CostModel(space)
    cfg = space.sample(random.Random(0))
    arrays = cost.to_arrays([cfg])
    with pytest.raises(ValueError, match=r"ks must have shape \(N, 20\)"):
        cost.evaluate_batch({**arrays, "ks": arrays["ks"][:, :5]})
    bad = arrays["e"].copy()
    bad[0, 2] = 5
    with pytest.raises(ValueError, match=r"e\[0, 2\]=5 not in \(3, 4, 6\)"):
        cost.evaluate_batch({**arrays, "e": bad})
    with pytest.raises(ValueError, match="arrays is missing 'd'"):
        cost.evaluate_batch({k: v for k, v in arrays.items() if k != "d"})
    with pytest.raises(TypeError, match="space_or_model must be"):
        CostModel(object())
