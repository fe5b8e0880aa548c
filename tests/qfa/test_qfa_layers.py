"""Dynamic quantized layers against float64 references built from the spec."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bquant_kernels import batchquant, lsq
from qfa.nn import DynamicBatchNorm2d, DynamicQConv2d, DynamicQDepthwiseConv2d, DynamicQLinear, DynamicSE
from qfa.nn.utils import make_divisible

BITS = (2, 3, 4, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _lsq_ref(w: torch.Tensor, s: float, bits: int, numel_full: int, g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """float64 LSQ forward and step gradient (spec 2)."""
    w = w.double()
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    v = w / abs(s)
    w_hat = abs(s) * torch.round(torch.clamp(v, qn, qp))
    inside = (v > qn) & (v < qp)
    term = torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp))
    grad_s = (g.double() * term).sum().item() / math.sqrt(numel_full * qp) * math.copysign(1.0, s)
    return w_hat, grad_s


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (0.3 if p.dim() == 1 else 0.0))


def test_kernel_transform_matches_float64_reference():
    torch.manual_seed(0)
    dw = DynamicQDepthwiseConv2d(16, (3, 5, 7), act="relu", se=False, quant_bits=BITS).double()
    with torch.no_grad():
        dw.weight.normal_()
    # identity init: the smaller kernels are centre crops
    assert torch.equal(dw.kernel(5), dw.weight[:, :, 1:6, 1:6])
    assert torch.equal(dw.kernel(3), dw.weight[:, :, 2:5, 2:5])
    with torch.no_grad():
        dw.kernel_transforms["7to5"].normal_()
        dw.kernel_transforms["5to3"].normal_()
    w = dw.weight.detach()
    m75, m53 = dw.kernel_transforms["7to5"].detach(), dw.kernel_transforms["5to3"].detach()
    k5 = (w[:, 0, 1:6, 1:6].reshape(16, 25) @ m75.T).reshape(16, 1, 5, 5)
    k3 = (k5[:, 0, 1:4, 1:4].reshape(16, 9) @ m53.T).reshape(16, 1, 3, 3)
    torch.testing.assert_close(dw.kernel(7), w, rtol=0, atol=0)
    torch.testing.assert_close(dw.kernel(5), k5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw.kernel(3), k3, rtol=1e-12, atol=1e-12)
    # the matrices are learned: gradients reach them through the kernel
    dw.kernel(3).sum().backward()
    assert dw.kernel_transforms["7to5"].grad.abs().sum() > 0 and dw.kernel_transforms["5to3"].grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_sliced_lsq_keeps_full_weight_scale(bits):
    torch.manual_seed(1)
    conv = DynamicQConv2d(24, 32, 1, quant_bits=BITS)
    with torch.no_grad():
        conv.weight.normal_()
    conv.active_out_channels = 16
    conv.set_active_bits(bits, 32)
    q = conv.w_quantizer[str(bits)]
    w_active = conv.weight[:16, :20]
    out = q(w_active, w_full=conv.weight)
    # init from the full weight (spec 2 convention)
    s = q.step.item()
    qp = 2 ** (bits - 1) - 1
    assert s == pytest.approx(2 * conv.weight.detach().abs().mean().item() / math.sqrt(qp), rel=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref_w, ref_gs = _lsq_ref(w_active.detach(), s, bits, conv.weight.numel(), g)
    torch.testing.assert_close(out.detach().double(), ref_w, rtol=1e-6, atol=1e-7)
    assert q.step.grad.item() == pytest.approx(ref_gs, rel=1e-4)
    # quantizing the full weight and slicing gives the same numbers and the same step gradient
    step = q.step.detach().clone().requires_grad_(True)
    full = lsq(conv.weight.detach(), step, bits)
    torch.testing.assert_close(full[:16, :20], out.detach(), rtol=0, atol=0)
    g_full = torch.zeros_like(full)
    g_full[:16, :20] = g
    full.backward(g_full)
    assert step.grad.item() == pytest.approx(q.step.grad.item(), rel=1e-5)


def test_depthwise_layer_matches_float64_composition():
    torch.manual_seed(2)
    # the reference backend on both sides: this checks the layer's composition, not a kernel
    dw = DynamicQDepthwiseConv2d(
        48, (3, 5, 7), stride=2, act="h_swish", se=True, quant_bits=BITS, backend="reference"
    ).double()
    _randomize(dw, 3)
    with torch.no_grad():
        dw.kernel_transforms["7to5"].copy_(torch.eye(25) + 0.05 * torch.randn(25, 25))
    dw.set_active_kernel_size(5)
    dw.set_active_bits(3, 4)
    c = 40  # active channels < 48
    x = torch.randn(4, c, 9, 9, dtype=torch.float64) * torch.linspace(0.2, 3.0, c, dtype=torch.float64)[:, None, None]
    y = dw.train()(x)
    # reference: quantize input (batch stats) -> conv with LSQ of the transformed kernel -> BN -> h_swish -> SE
    aq, wq = dw.a_quantizers["5"]["4"], dw.w_quantizers["5"]["3"]
    xq = batchquant(x, aq.theta.detach(), aq.offset.detach(), 4, backend="reference")
    w5 = dw.kernel(5).detach()
    g = torch.zeros_like(w5[:c])
    wq_ref, _ = _lsq_ref(w5[:c], wq.step.item(), 3, w5.numel(), g)
    z = F.conv2d(xq, wq_ref, None, 2, 2, 1, c)
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    z = (z - mean) / torch.sqrt(var + 1e-5) * dw.bn.weight[:c, None, None].detach() + dw.bn.bias[
        :c, None, None
    ].detach()
    z = z * torch.clamp(z + 3, 0, 6) / 6
    mid = make_divisible(c // 4, 8)
    p = z.mean((2, 3))
    h = torch.relu(p @ dw.se.reduce.weight[:mid, :c, 0, 0].detach().T + dw.se.reduce.bias[:mid].detach())
    a = torch.clamp(h @ dw.se.expand.weight[:c, :mid, 0, 0].detach().T + dw.se.expand.bias[:c].detach() + 3, 0, 6) / 6
    ref = z * a[:, :, None, None]
    torch.testing.assert_close(y.detach(), ref, rtol=1e-9, atol=1e-9)
    # gradients reach the weight, the transform, the active quantizers, BN and SE
    y.square().sum().backward()
    for name, p in [
        ("weight", dw.weight),
        ("7to5", dw.kernel_transforms["7to5"]),
        ("step", wq.step),
        ("theta", aq.theta),
        ("bn", dw.bn.weight),
        ("se", dw.se.reduce.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert dw.w_quantizers["7"]["3"].step.grad is None and dw.a_quantizers["3"]["4"].theta.grad is None


def test_batchnorm_batch_stats_in_training_running_stats_in_eval_no_ema():
    torch.manual_seed(4)
    bn = DynamicBatchNorm2d(32).double()
    _randomize(bn, 5)
    with torch.no_grad():
        bn.running_var.abs_().add_(0.1)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(6, 20, 5, 5, dtype=torch.float64) * 3 + 1
    y = bn.train()(x)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = bn.weight[:20, None, None].detach(), bn.bias[:20, None, None].detach()
    torch.testing.assert_close(y.detach(), (x - mean) / torch.sqrt(var + 1e-5) * w + b, rtol=1e-10, atol=1e-10)
    for k, v in bn.state_dict().items():  # never an EMA
        assert torch.equal(v, before[k]), k
    y = bn.eval()(x)
    rm, rv = bn.running_mean[:20, None, None], bn.running_var[:20, None, None]
    torch.testing.assert_close(y.detach(), (x - rm) / torch.sqrt(rv + 1e-5) * w + b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="input has 33 channels, this BatchNorm holds 32"):
        bn(torch.randn(2, 33, 2, 2, dtype=torch.float64))


def test_se_slices_to_active_channels():
    se = DynamicSE(64).double()
    _randomize(se, 6)
    x = torch.randn(3, 40, 4, 4, dtype=torch.float64)
    mid = make_divisible(40 // 4, 8)
    assert mid == 16
    p = x.mean((2, 3))
    h = torch.relu(p @ se.reduce.weight[:mid, :40, 0, 0].detach().T + se.reduce.bias[:mid].detach())
    a = F.hardsigmoid(h @ se.expand.weight[:40, :mid, 0, 0].detach().T + se.expand.bias[:40].detach())
    torch.testing.assert_close(se(x).detach(), x * a[:, :, None, None], rtol=1e-12, atol=1e-12)


def test_layer_input_checks_and_bits_resolution():
    conv = DynamicQConv2d(8, 16, 1, quant_bits=BITS)
    with pytest.raises(ValueError, match="input has 9 channels, this conv takes at most 8"):
        conv(torch.randn(1, 9, 2, 2))
    with pytest.raises(ValueError, match=r"w_bits=5: this layer has quantizers for \[2, 3, 4, 8\]"):
        conv.set_active_bits(5, 2)
    lin = DynamicQLinear(8, 3, quant_bits=BITS)
    with pytest.raises(ValueError, match="input has 10 features"):
        lin(torch.randn(2, 10))
    dw = DynamicQDepthwiseConv2d(8, (3, 5), act=None, se=False, quant_bits=BITS)
    assert list(dw.kernel_transforms.keys()) == ["5to3"]
    with pytest.raises(ValueError, match=r"ks=7 not in \(3, 5\)"):
        dw.set_active_kernel_size(7)


@pytest.mark.parametrize("fused", [False, True])
def test_max_subnet_step_dispatches_no_view_ops(fused):
    """At full width nothing is sliced, reshaped or aliased: each such view is an op forward and an
    autograd node backward (issue 18 counts the step's top-level ops). Also pins the total."""
    from torch.profiler import ProfilerActivity, profile

    from qfa import QFAMobileNetV3

    torch.manual_seed(0)
    model = QFAMobileNetV3(n_classes=10, width_mult=1.0, backend="cpu")
    model.fused_epilogue = fused
    model.set_active_config(model.space.make_config(ks=7, e=6, d=4, w_bits=4, a_bits=4, resolution=32))
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    names = [e.name for e in prof.events() if e.cpu_parent is None]
    views = [n for n in names if any(v in n for v in ("slice", "Slice", "reshape", "alias", "Alias", "::view"))]
    assert views == [], sorted(set(views))
    # 438 parameters get a gradient; the rest is conv, epilogue / quantizer, SE and head ops.
    assert len(names) <= (960 if fused else 1104), len(names)
