"""get_active_subnet(): a standalone static network with the supernet's exact eval output."""

from __future__ import annotations

import math
import random
from argparse import Namespace

import pytest
import torch

import qfa
from bquant_kernels import BatchQuantizer, LSQQuantizer
from qfa import MobileNetV3Subnet, QFAMobileNetV3
from qfa.checkpoint import save_supernet
from qfa.export.standalone import export_subnet
from qfa.nn import DynamicBatchNorm2d, QConv2d
from qfa.search.runtime import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw) -> QFAMobileNetV3:
    torch.manual_seed(0)
    return QFAMobileNetV3(n_classes=10, width_mult=0.25, bits_list=(2, 3, 4, 32), **kw)


@torch.no_grad()
def _randomize_state(model: QFAMobileNetV3, seed: int) -> None:
    """Trained-looking state: random transforms, BN statistics and quantizer parameters (all initialised)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "kernel_transforms" in name:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for m in model.modules():
        if isinstance(m, DynamicBatchNorm2d):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
        elif isinstance(m, BatchQuantizer):
            m.theta.copy_(0.3 * torch.randn(1, generator=gen))
            m.offset.copy_(0.2 * torch.randn(1, generator=gen))
            lo = -torch.rand(1, generator=gen)
            m.set_range(torch.cat([lo, 2 + 3 * torch.rand(1, generator=gen)]))


def _calib_loader(n_batches: int = 3, res: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 3, res, res, generator=gen), torch.randint(0, 10, (6,), generator=gen))
        for _ in range(n_batches)
    ]


def test_eval_output_equals_supernet_for_sampled_subnets():
    model = _tiny()
    _randomize_state(model, 1)
    rng = random.Random(0)
    x = torch.randn(4, 3, 32, 32)
    configs = [model.space.sandwich("min", rng), model.space.sandwich("max", rng)]
    configs += [model.space.sample(rng) for _ in range(3)]
    for cfg in configs:
        model.set_active_config(cfg)
        model.train()
        model(x)  # first use initialises the active LSQ steps
        model.eval()
        net = model.get_active_subnet()
        assert isinstance(net, MobileNetV3Subnet) and not net.training
        assert net.config == model.get_active_config()
        assert len(net.blocks) == 1 + sum(cfg.d)
        with torch.no_grad():
            torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)
        # the subnet is standalone: no supernet tensors are shared
        sup = {p.data_ptr() for p in model.parameters()}
        assert all(p.data_ptr() not in sup for p in net.parameters())
        # static shapes: depthwise kernels have the active size, expand convs the active width
        for i, b in enumerate(model.space.active_blocks(cfg.d)):
            conv = net.blocks[1 + i].conv
            assert conv.depth_conv.kernel_size == cfg.ks[b]
            assert conv.depth_conv.weight.shape[-1] == cfg.ks[b]


def test_equal_after_recalibration_and_when_calibrating_the_subnet():
    model = _tiny()
    _randomize_state(model, 2)
    model.sample_active_subnet(random.Random(5))
    model.train()(torch.randn(4, 3, 32, 32))
    loader = _calib_loader()
    qfa.calibrate(model, loader, num_batches=3)
    net = model.get_active_subnet()
    x = torch.randn(4, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
        # recalibrating the static net on the same data gives the same statistics
        net2 = model.get_active_subnet()
        for m in net2.modules():
            if isinstance(m, DynamicBatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            elif isinstance(m, BatchQuantizer):
                m.lo_hi.zero_()
        qfa.calibrate(net2, loader, num_batches=3)
        torch.testing.assert_close(net2(x), ref, rtol=1e-4, atol=1e-4)


def test_lsq_steps_are_copied_never_reinitialised():
    model = _tiny()
    model.set_active_subnet(ks=5, e=4, d=2, w_bits=3, a_bits=4)
    layer = model.blocks[1].conv.inverted_bottleneck
    q = layer.w_quantizer["3"]
    q.initialize(layer.weight)
    with torch.no_grad():
        q.step.fill_(0.0123)  # a "trained" value, far from the init convention
    net = model.get_active_subnet()
    static_q = net.blocks[1].conv.inverted_bottleneck.w_quantizer
    assert isinstance(static_q, LSQQuantizer) and static_q.bits == 3
    assert static_q.step.item() == pytest.approx(0.0123) and bool(static_q.initialized)
    # a step the supernet has not initialised yet gets the supernet's first-use value (full weight)
    dw = model.blocks[1].conv.depth_conv
    dq = net.blocks[1].conv.depth_conv.w_quantizer
    w_full = dw.kernel(5)
    expected = 2 * w_full.detach().abs().mean().item() / math.sqrt(3)
    assert dq.step.item() == pytest.approx(expected, rel=1e-6)
    c = net.blocks[1].conv.depth_conv.in_channels
    assert dq.step.item() != pytest.approx(2 * w_full[:c].detach().abs().mean().item() / math.sqrt(3), rel=1e-6)


def test_full_precision_subnet_has_no_quantizers_and_static_layers():
    model = _tiny()
    model.set_full_precision()
    net = model.get_active_subnet()
    assert not any(isinstance(m, (LSQQuantizer, BatchQuantizer)) for m in net.modules())
    model.set_active_subnet(w_bits=2, a_bits=2)
    net = model.get_active_subnet()
    convs = [m for m in net.modules() if isinstance(m, QConv2d)]
    assert convs[0].w_quantizer is None and convs[0].a_quantizer is None  # stem
    assert all(c.w_quantizer is not None and c.a_quantizer is not None for c in convs[1:])
    assert net.classifier.w_bits == net.classifier.a_bits == 8
    with pytest.raises(ValueError, match="input must be an"):
        net(torch.randn(2, 4, 32, 32))


def _quantizer_backends(net: torch.nn.Module) -> list[str | None]:
    return [m.backend for m in net.modules() if isinstance(m, (BatchQuantizer, LSQQuantizer))]


def test_backend_set_after_construction_reaches_the_static_subnet(tmp_path):
    """The supernet owns one backend name: setting it later (``model.backend``, or ``--backend`` of the
    search / export commands through qfa.search.runtime.load_model) reaches every quantizer, the static
    network get_active_subnet builds, and the standalone file's rebuilt network."""
    model = _tiny()
    assert model.backend is None and set(_quantizer_backends(model)) == {None}
    model.set_active_subnet(d=3, w_bits=3, a_bits=4)
    model.backend = "reference"
    assert set(_quantizer_backends(model)) == {"reference"}
    net = model.get_active_subnet()
    assert net.backend == "reference"
    backends = _quantizer_backends(net)
    assert len(backends) == 2 * (model.space.n_qlayers - 5 * 3)  # d=3: one inactive block of 3 layers per stage
    assert set(backends) == {"reference"}

    path = tmp_path / "supernet.pt"
    save_supernet(_tiny(), path)
    loaded = load_model(Namespace(checkpoint=str(path), backend="reference"), torch.device("cpu"))
    loaded.set_active_subnet(d=2, w_bits=4, a_bits=4)
    assert loaded.backend == "reference"
    assert set(_quantizer_backends(loaded.get_active_subnet())) == {"reference"}
    exported = export_subnet(loaded, tmp_path / "subnet.pt")
    assert set(_quantizer_backends(exported)) == {"reference"}

    with pytest.raises(TypeError, match="backend must be a backend name or None"):
        model.backend = 3
