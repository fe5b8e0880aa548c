"""Standalone export: bit-identical outputs, weights on the LSQ grid, loading without the supernet."""

from __future__ import annotations

import random

import pytest
import torch

import qfa
from bquant_kernels import lsq
from qfa.export.standalone import export_subnet, load_standalone, quantized_layers

RES = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated_supernet(seed: int, bits_list=(2, 3, 4, 32)):
    """A small untrained supernet with a random active subnet, recalibrated on random images."""
    torch.manual_seed(seed)
    model = qfa.QFAMobileNetV3(
        n_classes=10, width_mult=0.25, ks_list=(3, 5), expand_list=(2, 3), depth_list=(1, 2), bits_list=bits_list,
        resolutions=(RES,),
    )  # fmt: skip
    cfg = model.space.sample(random.Random(seed))
    model.set_active_config(cfg)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(32, 3, RES, RES, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    qfa.calibrate(model, batches, num_batches=2)
    x = torch.randn(16, 3, RES, RES, generator=g) * 1.5
    return model, cfg, x


@pytest.mark.parametrize("seed", [0, 1])
def test_standalone_reproduces_the_supernet_exactly(tmp_path, seed, monkeypatch):
    model, cfg, x = calibrated_supernet(seed)
    with torch.no_grad():
        ref = model(x)
    export_subnet(model, tmp_path / "net.pt", resolution=RES, note="test")

    def _no_supernet(*args, **kwargs):
        raise AssertionError("loading a standalone model must not build a supernet")

    monkeypatch.setattr(qfa.QFAMobileNetV3, "__init__", _no_supernet)
    net = load_standalone(tmp_path / "net.pt")
    assert not net.training and net.metadata == {"note": "test"}
    assert net.config.to_dict() == {**cfg.to_dict(), "resolution": RES}
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out, ref)
    # Quantized weights are stored on their grid: quantizing them again changes nothing.
    n_quantized = 0
    for _, layer in quantized_layers(net):
        if layer.w_quantizer is not None:
            q = layer.w_quantizer
            assert torch.equal(lsq(layer.weight, q.step, q.bits, signed=q.signed), layer.weight)
            n_quantized += 1
    n = model.space.n_qlayers
    active = [0, 1, *(2 + 3 * b + k for b in model.space.active_blocks(cfg.d) for k in range(3)), n - 3, n - 2, n - 1]
    assert n_quantized == sum(cfg.w_bits[i] != 32 for i in active) > 0


def test_full_precision_layers_export(tmp_path):
    model, cfg, x = calibrated_supernet(3)
    model.set_active_subnet(w_bits=32, a_bits=32)  # the teacher: no quantizer anywhere
    with torch.no_grad():
        ref = model(x)
    export_subnet(model, tmp_path / "fp.pt", resolution=RES)
    net = load_standalone(tmp_path / "fp.pt")
    assert all(layer.w_quantizer is None for _, layer in quantized_layers(net))
    with torch.no_grad():
        assert torch.equal(net(x), ref)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="standalone model not found"):
        load_standalone(tmp_path / "missing.pt")
    torch.save({"format": "qfa-supernet"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a qfa standalone model"):
        load_standalone(tmp_path / "other.pt")
    model, _, _ = calibrated_supernet(0)
    export_subnet(model, tmp_path / "net.pt", resolution=RES)
    state = torch.load(tmp_path / "net.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        load_standalone(tmp_path / "future.pt")
