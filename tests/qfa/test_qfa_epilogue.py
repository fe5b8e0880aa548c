"""The supernet with fused layer epilogues (``model.fused_epilogue``) against the separate modules."""

from __future__ import annotations

import copy

import pytest
import torch

import qfa
from qfa import QFAMobileNetV3
from qfa.train import options

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dtype: torch.dtype, w_bits: int) -> QFAMobileNetV3:
    torch.manual_seed(0)
    model = QFAMobileNetV3(n_classes=7, width_mult=0.35, bits_list=(2, 3, 4, 32), dropout=0.0).to(dtype)
    model.set_active_subnet(ks=[3, 5, 7, 5] * 5, e=[3, 4, 6, 3] * 5, d=[2, 3, 2, 4, 3], w_bits=w_bits, a_bits=4)
    return model


def _images(dtype: torch.dtype, n: int = 6, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last)
    )


def _logits_and_grads(model: QFAMobileNetV3, x: torch.Tensor, fused: bool):
    model.fused_epilogue = fused
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_is_the_default_and_reaches_every_layer():
    model = _model(torch.float32, 4)
    assert model.fused_epilogue
    model.fused_epilogue = False
    assert not any(getattr(m, "fused_epilogue", False) for m in model.modules())
    model.fused_epilogue = True
    assert model.blocks[1].conv.depth_conv.fused_epilogue and model.first_conv.fused_epilogue


def _bn_calls(model: QFAMobileNetV3, x: torch.Tensor) -> int:
    """How many BatchNorm modules run their own forward (a fused layer bypasses its BN module)."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if "BatchNorm" in type(m).__name__
    ]
    model(x)
    for hk in hooks:
        hk.remove()
    return len(calls)


def test_fuses_only_where_the_op_runs_the_quantizer_backends_kernels(monkeypatch):
    """On the cuda backend the op would run Triton's kernels (unmeasured on a GPU): those layers keep the
    separate modules. Simulated on the CPU by making the op report another implementation."""
    model, x = _model(torch.float32, 4), _images(torch.float32)
    model.fused_epilogue = False
    separate = _bn_calls(model, x)
    model.fused_epilogue = True
    assert _bn_calls(model, x) < separate  # cpu backend: the layers with an activation or a quantizer fuse
    import qfa.nn.dynamic

    monkeypatch.setattr(qfa.nn.dynamic, "fused_backend", lambda backend, y: "triton")
    assert _bn_calls(model, x) == separate


def test_same_logits_and_gradients_float64():
    """float64 with full-precision weights: no value lands on a rounding tie, so both paths agree to
    float64 rounding. (With quantized weights conv outputs lie on a lattice and an element can sit
    exactly at its channel's mean, where ReLU's mask depends on the last bit of the mean: a tie like
    a bin edge, decided differently by the two ways of computing the mean.)"""
    model = _model(torch.float64, 32)
    x = _images(torch.float64)
    out_u, grads_u = _logits_and_grads(model, x, False)
    out_f, grads_f = _logits_and_grads(model, x, True)
    torch.testing.assert_close(out_f, out_u, rtol=1e-10, atol=1e-12)
    assert grads_f.keys() == grads_u.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-7, atol=1e-9 * grads_u[name].abs().max(),
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_same_logits_and_gradients_float64_w4a4_off_ties():
    """Quantized weights and activations, float64, BN affine parameters drawn away from the ties (a
    non-zero bias moves the elements that sit at their channel's mean off ReLU's kink): both paths agree
    to float64 rounding in every logit and every gradient, quantizer steps, thetas and offsets included."""
    model = _model(torch.float64, 4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn.bias"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) - 0.5)
            elif name.endswith("bn.weight"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
    x = _images(torch.float64)
    out_u, grads_u = _logits_and_grads(model, x, False)
    out_f, grads_f = _logits_and_grads(model, x, True)
    torch.testing.assert_close(out_f, out_u, rtol=1e-10, atol=1e-12)
    assert grads_f.keys() == grads_u.keys()
    assert any(n.endswith("theta") for n in grads_u) and any(n.endswith("step") for n in grads_u)
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-7, atol=1e-9 * grads_u[name].abs().max(),
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_every_bn_runs_in_a_fused_op_at_w4a4():
    """Chained across blocks, every BN of a W4A4 subnet is in a fused epilogue: the project convs' too
    (with the shortcut add and the next block's quantizer); none runs its own module."""
    model, x = _model(torch.float32, 4), _images(torch.float32)
    assert _bn_calls(model, x) == 0
    model.fused_epilogue = False
    assert _bn_calls(model, x) > 0


def _se_multiplies(model: QFAMobileNetV3, x: torch.Tensor) -> int:
    """How many squeeze-excitation gate multiplies run as ops of their own in a forward."""
    model(x)  # warm-up: the LSQ steps' initialisation multiplies
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return sum(e.name == "aten::mul" and e.cpu_parent is None for e in prof.events())


def test_se_gate_multiply_runs_in_the_quantizer_op(monkeypatch):
    """With SE, the project conv's quantizer takes SE's gate (``gated_batchquant``): no multiply of its own,
    where the quantizer's backend runs the gated kernel itself (as for the epilogues); the numbers are
    the composition's (the float64 tests above run through it)."""
    import qfa.nn.dynamic
    from bquant_kernels.gated import gated_backend

    model, x = _model(torch.float32, 4), _images(torch.float32)
    if gated_backend(model.backend, x) != "cpu":
        pytest.skip("the compiled extension (the cpu backend's gated kernel) is not built here")
    se_blocks = set()  # the SE blocks this subnet runs
    hooks = [m.register_forward_pre_hook(lambda m, _: se_blocks.add(id(m))) for m in model.modules()
             if getattr(m, "se", None) is not None]  # fmt: skip
    assert _se_multiplies(model, x) == 0
    for hk in hooks:
        hk.remove()
    assert se_blocks
    monkeypatch.setattr(qfa.nn.dynamic, "gated_backend", lambda backend, y: "triton")
    assert _se_multiplies(model, x) == len(se_blocks)


def test_mixed_bits_with_unquantized_inputs_float64():
    """Per-layer activation bits with some 32 (layers whose input is not quantized: the chain hands
    on the activation itself): both paths agree to float64 rounding in logits and every gradient."""
    model = _model(torch.float64, 32)
    n = len(model.space.qlayer_names)
    model.set_active_subnet(a_bits=[(4, 32, 2, 32, 3)[i % 5] for i in range(n)])
    x = _images(torch.float64)
    out_u, grads_u = _logits_and_grads(model, x, False)
    out_f, grads_f = _logits_and_grads(model, x, True)
    torch.testing.assert_close(out_f, out_u, rtol=1e-10, atol=1e-12)
    assert grads_f.keys() == grads_u.keys()
    # Some BN biases feed only an unquantized conv and the next BN, which removes any shift: their
    # gradient is 0 up to rounding (1e-16), so the absolute tolerance is on the scale of all gradients.
    scale = max(float(g.abs().max()) for g in grads_u.values())
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-7, atol=1e-9 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_same_logits_float32_w4a4():
    model = _model(torch.float32, 4)
    x = _images(torch.float32)
    out_u, grads_u = _logits_and_grads(model, x, False)
    out_f, grads_f = _logits_and_grads(model, x, True)
    torch.testing.assert_close(out_f, out_u, rtol=1e-3, atol=1e-3 * out_u.abs().max())
    total_u = torch.cat([g.flatten() for g in grads_u.values()])
    total_f = torch.cat([grads_f[n].flatten() for n in grads_u])
    assert (total_f - total_u).norm() <= 0.05 * total_u.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_16bit_fuses_with_the_separate_modules_numbers(dtype):
    """Under 16-bit autocast the layers fuse where the op runs Triton's kernels (here the reference
    backend, the composition of the separate ops, drives the same chaining; the kernels' 16-bit numbers
    are tests/kernels/test_epilogue.py's): the logits are those of the separate modules, and the
    gradients differ only by where the backward rounds to 16 bits (the separate ops after each op, the
    fused one once): a few percent in bf16, 16-bit noise that moves a float32 run's gradients by over
    100% on this untrained net with 4-bit activations."""
    model, x = _model(torch.float32, 4), _images(torch.float32)
    model.backend = "reference"
    model.fused_epilogue = False
    with torch.autocast("cpu", dtype=dtype):
        separate = _bn_calls(model, x)
        out_u, grads_u = _logits_and_grads(model, x, False)
        out_f, grads_f = _logits_and_grads(model, x, True)
        model.fused_epilogue = True
        assert _bn_calls(model, x) == 0 < separate  # the fused path ran
    assert out_u.dtype == dtype
    torch.testing.assert_close(out_f, out_u, rtol=0, atol=0)
    assert grads_f.keys() == grads_u.keys()
    total_u = torch.cat([g.flatten() for g in grads_u.values()])
    total_f = torch.cat([grads_f[n].flatten() for n in grads_u])
    assert total_f.isfinite().all()
    assert (total_f - total_u).norm() <= 0.15 * total_u.norm()


def test_cpu_backend_keeps_16bit_epilogues_separate():
    """The CPU kernel's 16-bit loops are slower than the separate ops: under bf16 autocast the cpu
    backend's layers keep the modules (float32 fuses)."""
    from bquant_kernels.epilogue import fused_backend

    model, x = _model(torch.float32, 4), _images(torch.float32)
    if fused_backend(model.backend, x) != "cpu":
        pytest.skip("the compiled extension (the cpu backend's epilogue kernel) is not built here")
    model.fused_epilogue = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        separate = _bn_calls(model, x)
        model.fused_epilogue = True
        assert _bn_calls(model, x) == separate
    assert _bn_calls(model, x) == 0


def test_calibration_and_eval_agree():
    """Recalibration (batch statistics into BN's and BatchQuant's sinks) through the fused op gives the
    unfused path's running statistics and ranges, and so its evaluation logits."""
    base = _model(torch.float64, 32)
    batches = [(_images(torch.float64, 5, seed=s), None) for s in range(3)]
    results = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        model.fused_epilogue = fused
        qfa.calibrate(model, batches, num_batches=3)
        with torch.no_grad():
            results.append((model(_images(torch.float64, 4, seed=9)), model.state_dict()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    for key, value in results[0][1].items():
        if key.endswith(("running_mean", "running_var", "lo_hi")):
            torch.testing.assert_close(results[1][1][key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_train_option_switches_it_off():
    opts = options.resolve(options.TrainOptions, {"fused_epilogue": False, "data": "synthetic"})
    assert opts.fused_epilogue is False
    parser = options.argparse.ArgumentParser()
    options.add_arguments(parser, options.TrainOptions)
    assert parser.parse_args(["--no-fused-epilogue"]).fused_epilogue is False
