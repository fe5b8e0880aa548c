"""qfa.checkpoint: the published QFA and Once-for-All loaders (state dicts built from the TSV layouts)
and our own atomic, versioned format."""

from __future__ import annotations

import csv
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from bquant_kernels import BatchQuantizer
from qfa import QFAMobileNetV3
from qfa.checkpoint import (
    CheckpointKeyError,
    load_ofa_fp,
    load_published_qfa,
    load_supernet,
    save_supernet,
)

DATA = Path(__file__).resolve().parents[1] / "data"  # copies of the published layout tables


pytestmark = pytest.mark.usefixtures("one_thread")


def _state_dict_from_tsv(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    path = DATA / name
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    with path.open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            shape = tuple(int(s) for s in row["shape"].strip("()").split(",") if s.strip())
            if row["dtype"] == "torch.int64":
                sd[row["key"]] = torch.randint(0, 1000, shape, generator=gen)
            else:
                sd[row["key"]] = torch.randn(shape, generator=gen)
    return sd


@pytest.fixture(scope="module")
def model() -> QFAMobileNetV3:
    return QFAMobileNetV3()


def _published_to_ours(key: str) -> tuple[str, str] | None:
    """Where a published key lands in our state dict: (our key, how), or None when ignored.
    Written independently of the loader, with plain string rules."""
    if key.endswith(("num_batches_tracked", "observer.min_val", "observer.max_val")):
        return None
    k = key.replace(".mobile_inverted_conv.", ".conv.").replace("se.fc.", "se.")
    for layer in ("first_conv.conv.", "final_expand_layer.conv.", "feature_mix_layer.conv."):
        if k.startswith(layer):
            k = layer[: -len("conv.")] + k[len(layer) :]
    k = k.replace("classifier.linear.linear.", "classifier.").replace("classifier.linear.", "classifier.")
    for part in ("inverted_bottleneck", "depth_conv", "point_linear"):
        k = k.replace(f".{part}.conv.", f".{part}.")
    k = k.replace(".conv.weight", ".weight")
    k = k.replace(".gamma", ".bn.weight").replace(".beta", ".bn.bias")
    if k.endswith((".running_mean", ".running_var")) and "_quantizer" not in k:
        k = k.rsplit(".", 1)[0] + ".bn." + k.rsplit(".", 1)[1]
    k = k.replace("7to5_matrix", "kernel_transforms.7to5").replace("5to3_matrix", "kernel_transforms.5to3")
    k = k.replace(".quantizers.", ".")
    if "a_quantizer" in k:
        if k.endswith(".scale"):
            return k[: -len("scale")] + "theta", "copy"
        if k.endswith(".observer.running_min"):
            return k[: -len("observer.running_min")] + "lo_hi", "lo"
        if k.endswith(".observer.running_max"):
            return k[: -len("observer.running_max")] + "lo_hi", "hi"
        return k, "copy"  # offset
    if "w_quantizer" in k:
        return k[: -len("scale")] + "step", "copy"
    return k, "copy"


def test_published_qfa_loader_puts_every_value_in_place(model):
    sd = _state_dict_from_tsv("qfa-published-state-dict.tsv")
    assert len(sd) == 3867
    load_published_qfa(model, sd)
    ours = model.state_dict()
    landed = set()
    for key, value in sd.items():
        target = _published_to_ours(key)
        if target is None:
            continue
        ours_key, how = target
        assert ours_key in ours, (key, ours_key)
        got = ours[ours_key]
        if how == "lo":
            assert torch.equal(got[0:1], value), key
        elif how == "hi":
            assert torch.equal(got[1:2], value), key
        else:
            assert torch.equal(got, value), key
        landed.add(ours_key)
    # every tensor of ours was written, and every LSQ step is marked initialised (no re-init on use)
    assert landed == {k for k in ours if not k.endswith(".initialized")}
    assert all(bool(v) for k, v in ours.items() if k.endswith(".initialized"))
    q = model.blocks[3].conv.depth_conv.w_quantizers["5"]["3"]
    assert q._initialized
    # spot checks of the documented mapping
    name = "blocks.7.mobile_inverted_conv.depth_conv.conv.a_quantizers.5.quantizers.3"
    a3 = model.blocks[7].conv.depth_conv.a_quantizers["5"]["3"]
    assert isinstance(a3, BatchQuantizer)
    assert torch.equal(a3.theta, sd[f"{name}.scale"])
    assert torch.equal(a3.lo_hi, torch.cat([sd[f"{name}.observer.running_min"], sd[f"{name}.observer.running_max"]]))
    assert torch.equal(model.classifier.weight, sd["classifier.linear.linear.weight"])
    assert torch.equal(model.first_conv.bn.weight, sd["first_conv.conv.gamma"])


def test_published_loader_reports_unknown_and_missing_keys(model):
    sd = _state_dict_from_tsv("qfa-published-state-dict.tsv", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = "blocks.4.mobile_inverted_conv.point_linear.conv.w_quantizer.quantizers.3.scale"
    del sd[dropped]
    sd["blocks.4.mobile_inverted_conv.bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        load_published_qfa(model, sd)
    msg = str(err.value)
    assert "1 unknown key(s) [blocks.4.mobile_inverted_conv.bogus.weight]" in msg
    assert "1 missing key(s) [blocks.4.conv.point_linear.w_quantizer.3.step]" in msg
    for k, v in model.state_dict().items():  # unchanged on error
        assert torch.equal(v, before[k]), k
    tiny = QFAMobileNetV3(n_classes=10, width_mult=0.25)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_published_qfa(tiny, _state_dict_from_tsv("qfa-published-state-dict.tsv"))


def test_ofa_loader_and_lsq_init_from_fp_weights(model):
    sd = _state_dict_from_tsv("ofa-mbv3-w1.2-state-dict.tsv", seed=2)
    sd = {f"module.{k}": v for k, v in sd.items()}  # a DDP-saved checkpoint
    with torch.no_grad():
        model.blocks[2].conv.depth_conv.kernel_transforms["7to5"].copy_(torch.eye(25))
        model.blocks[2].conv.depth_conv.kernel_transforms["5to3"].copy_(torch.eye(9))
    load_ofa_fp(model, {"state_dict": sd})
    sd = {k[len("module.") :]: v for k, v in sd.items()}
    assert torch.equal(model.first_conv.weight, sd["first_conv.conv.weight"])
    assert torch.equal(model.first_conv.bn.running_var, sd["first_conv.bn.running_var"])
    assert torch.equal(
        model.blocks[0].conv.depth_conv.weight, sd["blocks.0.mobile_inverted_conv.depth_conv.conv.weight"]
    )
    assert torch.equal(
        model.blocks[0].conv.point_linear.bn.bias, sd["blocks.0.mobile_inverted_conv.point_linear.bn.bias"]
    )
    ib = model.blocks[5].conv.inverted_bottleneck
    assert torch.equal(ib.weight, sd["blocks.5.mobile_inverted_conv.inverted_bottleneck.conv.conv.weight"])
    assert torch.equal(ib.bn.weight, sd["blocks.5.mobile_inverted_conv.inverted_bottleneck.bn.bn.weight"])
    se = model.blocks[20].conv.depth_conv.se
    assert torch.equal(se.expand.bias, sd["blocks.20.mobile_inverted_conv.depth_conv.se.fc.expand.bias"])
    assert torch.equal(model.feature_mix_layer.weight, sd["feature_mix_layer.conv.weight"])
    assert torch.equal(model.classifier.bias, sd["classifier.linear.bias"])
    # LSQ steps from the full FP weights (spec 2); BatchQuant at l = 1, o = 0
    for bits in (2, 3, 4, 8):
        qp = 2 ** (bits - 1) - 1
        q = ib.w_quantizer[str(bits)]
        assert bool(q.initialized)
        assert q.step.item() == pytest.approx(2 * ib.weight.abs().mean().item() / math.sqrt(qp), rel=1e-6)
        dw = model.blocks[2].conv.depth_conv
        centre5 = dw.weight[:, :, 1:6, 1:6]  # identity transform: the centre crop of the 7x7
        step5 = dw.w_quantizers["5"][str(bits)].step.item()
        assert step5 == pytest.approx(2 * centre5.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    assert all(
        m.theta.item() == 0 and m.offset.item() == 0 and not m.lo_hi.any()
        for m in model.modules()
        if isinstance(m, BatchQuantizer)
    )
    # unknown / missing keys are listed
    del sd["classifier.linear.bias"]
    sd["classifier.linear.extra"] = torch.zeros(1)
    with pytest.raises(
        CheckpointKeyError, match=r"unknown key\(s\) \[classifier.linear.extra\].*missing key\(s\) \[classifier.bias\]"
    ):
        load_ofa_fp(model, sd)


def test_own_format_round_trip_atomic_and_versioned(tmp_path):
    torch.manual_seed(0)
    src = QFAMobileNetV3(n_classes=5, width_mult=0.25, bits_list=(2, 3, 4, 32), dropout=0.2)
    src.set_active_subnet(w_bits=2, a_bits=3)
    src.train()(torch.randn(2, 3, 32, 32))  # initialise the active LSQ steps
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, BatchQuantizer):
                m.theta.normal_()
                m.lo_hi.copy_(torch.tensor([-0.5, 2.0]))
    path = tmp_path / "ckpt" / "supernet.pt"
    save_supernet(src, path, extra={"epoch": 3, "lr": torch.tensor(0.1)})
    assert sorted(os.listdir(path.parent)) == ["supernet.pt"]  # no temp files left
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == 1 and payload["kind"] == "qfa-supernet"
    loaded, extra = load_supernet(path, return_extra=True)
    assert extra["epoch"] == 3 and loaded.space == src.space and loaded.dropout.p == 0.2
    for (k, a), (k2, b) in zip(src.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    # loaded steps are initialised: a forward does not re-initialise them
    loaded.set_active_subnet(w_bits=2, a_bits=3)
    q = loaded.blocks[1].conv.inverted_bottleneck.w_quantizer["2"]
    with torch.no_grad():
        q.step.fill_(0.5)
    loaded.train()(torch.randn(2, 3, 32, 32))
    assert q.step.item() == 0.5
    # into an existing model of another phase (bits_list without 32): same layout
    phase1 = QFAMobileNetV3(n_classes=5, width_mult=0.25, bits_list=(2, 3, 4), dropout=0.2)
    assert load_supernet(path, phase1) is phase1
    # a failing save leaves the old file intact and no temp file
    old = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_supernet(src, path, extra={"bad": lambda: None})
    assert path.read_bytes() == old and sorted(os.listdir(path.parent)) == ["supernet.pt"]


def test_own_format_errors(tmp_path):
    model = QFAMobileNetV3(n_classes=5, width_mult=0.25)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="is not a qfa supernet checkpoint"):
        load_supernet(bad, model)
    path = tmp_path / "ok.pt"
    save_supernet(model, path)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_supernet(bad, model)
    other = QFAMobileNetV3(n_classes=5, width_mult=0.25, ks_list=(3, 5))
    with pytest.raises(CheckpointKeyError, match="unknown key"):
        load_supernet(path, other)
    with pytest.raises(TypeError, match="model must be a QFAMobileNetV3"):
        save_supernet(torch.nn.Linear(2, 2), path)
