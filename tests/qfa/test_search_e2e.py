"""End to end on the digits demo: train a tiny supernet, ``qfa collect`` -> ``qfa predictor`` ->
``qfa search`` -> ``qfa export``, through the ``qfa`` entry point (:func:`qfa.cli.main`).

The supernet is CI-sized (width 0.25, 2 blocks per stage, 8-24 px) and trained for 120 steps: a
full-precision warm-up, then sandwich steps (max + random subnet) over quantized subnets. Its bit
options are (3, 4): 2-bit activations on 8-channel layers do not learn in that budget, and the test
needs subnet accuracies that depend on the config for the predictor to rank them.
"""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import qfa
from qfa.checkpoint import save_supernet
from qfa.cli import main
from qfa.commands import collect, export, predictor, search
from qfa.data import build_loaders
from qfa.export.standalone import load_standalone
from qfa.search.predictor import load_predictor
from qfa.search.records import read_records

RESOLUTIONS = (8, 12, 16, 20, 24)
DEMO_SUPERNET = dict(
    n_classes=10, width_mult=0.25, ks_list=(3, 5), expand_list=(2, 3), depth_list=(1, 2), bits_list=(3, 4),
    dropout=0.0, resolutions=RESOLUTIONS,
)  # fmt: skip
N_SAMPLES = 48
DATA_ARGS = ["--data", "digits", "--batch-size", "300", "--calib-batches", "1", "--calib-batch-size", "128"]


def _cli(module, argv: list[str]) -> int:
    """``qfa <command> argv`` through the real entry point."""
    return main([module.__name__.rsplit(".", 1)[-1], *argv])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and robust to a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_demo_supernet(fp_steps: int = 40, quant_steps: int = 80, seed: int = 0) -> qfa.QFAMobileNetV3:
    torch.manual_seed(seed)
    model = qfa.QFAMobileNetV3(**DEMO_SUPERNET)
    train, _ = build_loaders("digits", batch_size=128, resolution=max(RESOLUTIONS), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    rng = random.Random(seed)
    model.train()
    step, epoch = 0, 0
    while step < fp_steps + quant_steps:
        train.set_epoch(epoch)
        for images, labels in train:
            if step == fp_steps:
                for group in opt.param_groups:
                    group["lr"] = 0.05
            opt.zero_grad(set_to_none=True)
            if step < fp_steps:
                plan = [(model.set_full_precision, max(RESOLUTIONS))]
            else:
                plan = [
                    (lambda: model.set_sandwich_subnet("max", rng), max(RESOLUTIONS)),
                    (lambda: model.sample_active_subnet(rng), rng.choice(RESOLUTIONS)),
                ]
            for activate, res in plan:
                activate()
                x = F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
                F.cross_entropy(model(x), labels).backward()
            opt.step()
            step += 1
            if step == fp_steps + quant_steps:
                break
        epoch += 1
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    save_supernet(_train_demo_supernet(), root / "supernet.pt")
    return root


def _supernet(work) -> list[str]:
    return ["--checkpoint", str(work / "supernet.pt")]


def _collect(work, out, num_samples: int) -> int:
    args = [*_supernet(work), *DATA_ARGS, "--out", str(out), "--num-samples", str(num_samples)]
    return _cli(collect, [*args, "--no-progress"])


@pytest.fixture(scope="module")
def samples(work):
    out = work / "samples.jsonl"
    assert _collect(work, out, N_SAMPLES - 8) == 0
    before = out.read_bytes()
    with open(out, "ab") as f:  # a killed run left half a line behind
        f.write(b'{"index": 999, "conf')
    # Resume with a larger budget, as two torchrun ranks would (sequentially here).
    for rank in (0, 1):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
                mp.setenv(k, v)
            if rank == 0:  # rank 0 sees the partial line, then its first append cuts it off
                with pytest.warns(UserWarning, match="partial last line"):
                    assert _collect(work, out, N_SAMPLES) == 0
            else:
                assert _collect(work, out, N_SAMPLES) == 0
    assert out.read_bytes().startswith(before)  # earlier samples untouched
    return out


def test_collect_is_complete_resumable_and_deterministic(work, samples):
    recs = read_records(samples)
    assert sorted(r["index"] for r in recs) == list(range(N_SAMPLES))
    for r in recs:
        cfg = qfa.SubnetConfig.from_dict(r["config"])
        assert cfg.resolution in RESOLUTIONS
        for key in ("top1", "top5", "loss", "lut_flops", "bitops", "macs", "params"):
            assert np.isfinite(r[key])
        assert r["images"] == 297  # the whole held-out split
        assert r["bitops"] == pytest.approx(64 * r["lut_flops"])
    top1 = np.array([r["top1"] for r in recs])
    assert top1.max() - top1.min() > 10.0, "subnet accuracies should depend on the config"
    # Re-measuring a sample in a fresh process state gives the same record (deterministic sampling + eval).
    again = work / "again.jsonl"
    _collect(work, again, 2)
    by_index = {r["index"]: r for r in recs}
    for r in read_records(again):
        assert r["config"] == by_index[r["index"]]["config"]
        assert r["top1"] == by_index[r["index"]]["top1"]


@pytest.fixture(scope="module")
def predictor_path(work, samples):
    out = work / "predictor.pt"
    assert _cli(predictor, ["--samples", str(samples), "--out", str(out), "--val-fraction", "0.33", "--seed", "0"]) == 0
    return out


def test_predictor_beats_constant_and_ranks(predictor_path):
    report = json.loads(predictor_path.with_suffix(".json").read_text())
    held = report["held_out"]
    print(
        f"\npredictor on digits samples: {report['n_train']} train / {held['n']} held-out; "
        f"RMSE {held['rmse']:.3f} vs constant {held['baseline_rmse']:.3f}; Kendall tau {held['kendall_tau']:.3f}"
    )
    assert held["rmse"] < held["baseline_rmse"]
    assert held["kendall_tau"] > 0.5
    assert predictor_path.with_suffix(".png").stat().st_size > 1000
    assert load_predictor(predictor_path).extra["held_out"] == held


@pytest.fixture(scope="module")
def search_result(work, samples, predictor_path):
    recs = read_records(samples)
    limit = float(np.median([r["lut_flops"] for r in recs])) / 1e6
    args = [*_supernet(work), *DATA_ARGS, "--predictor", str(predictor_path), "--samples", str(samples)]
    args += "--population 16 --generations 6 --crossover 0.1 --mutation 0.05 --seed 3 --max-reevaluate 4".split()
    args += ["--max-mflops", f"{limit:.6f}", "--no-progress"]
    out = work / "front.json"
    assert _cli(search, [*args, "--out", str(out)]) == 0
    return out, args, limit


def test_search_front_respects_constraints_and_is_deterministic(work, search_result):
    out, args, limit = search_result
    result = json.loads(out.read_text())
    front, cands = result["front"], result["candidates"]
    assert front and result["reevaluated"]
    for e in cands:
        assert e["lut_flops"] <= limit * 1e6
        assert set(e["config"]["w_bits"][:-1]) <= {3, 4}
    measured = [e for e in front if e["status"] == "measured"]
    assert measured == front
    for e in front:  # non-dominated among the measured ones
        others = [o for o in cands if o.get("status") == "measured" and o is not e]
        assert not any(
            o["measured_top1"] >= e["measured_top1"]
            and o["lut_flops"] <= e["lut_flops"]
            and (o["measured_top1"] > e["measured_top1"] or o["lut_flops"] < e["lut_flops"])
            for o in others
        )
    assert out.with_suffix(".png").stat().st_size > 1000
    again = work / "front_again.json"
    assert _cli(search, [*args, "--out", str(again), "--no-reevaluate"]) == 0
    assert [e["config"] for e in json.loads(again.read_text())["candidates"]] == [e["config"] for e in cands]


def test_search_bad_input(work, predictor_path):
    base = [*_supernet(work), "--predictor", str(predictor_path), "--out", str(work / "x.json")]
    base += "--population 4 --generations 1 --no-reevaluate --no-progress".split()
    with pytest.raises(ValueError, match=r"bit-width\(s\) \[2\] not in this supernet's bits_list \(3, 4\)"):
        _cli(search, [*base, "--bits", "2", "4"])
    with pytest.raises(ValueError, match="no subnet can meet the constraints"):
        _cli(search, [*base, "--max-mflops", "1e-9"])
    with pytest.raises(FileNotFoundError, match="predictor file not found"):
        _cli(search, [*base, "--predictor", str(work / "missing.pt")])
    with pytest.raises(FileNotFoundError, match="--checkpoint: file not found"):
        _cli(search, [*base, "--checkpoint", str(work / "missing.pt")])
    save_supernet(qfa.QFAMobileNetV3(**{**DEMO_SUPERNET, "depth_list": (1, 2, 3)}), work / "other.pt")
    with pytest.raises(ValueError, match="search space differs"):
        _cli(search, [*base, "--checkpoint", str(work / "other.pt")])


def test_export_reproduces_the_subnet(work, search_result):
    out, _, _ = search_result
    result = json.loads(out.read_text())
    exp = work / "export"
    rc = _cli(export, [*_supernet(work), *DATA_ARGS, "--subnets", str(out), "--index", "0", "--out-dir", str(exp)])
    report = json.loads((exp / "export.json").read_text())
    print(
        f"\nONNX vs PyTorch on {report['onnx']['images']} digits images: max |diff| "
        f"{report['onnx']['max_abs_diff']:.3g} (max |logit| {report['onnx']['max_abs_logit']:.3g}), "
        f"argmax agreement {report['onnx']['argmax_agreement']:.4f}"
    )
    assert rc == 0
    assert report["standalone"]["exact"]
    assert report["config"] == result["front"][0]["config"]
    assert report["onnx"]["passed"] and report["onnx"]["images_within_atol"] >= 0.9
    assert report["onnx"]["argmax_agreement"] >= 0.99
    net = load_standalone(exp / "subnet.pt")  # no supernet needed
    assert net.config.resolution == report["config"]["resolution"]
    ops = {n.op_type for n in onnx.load(exp / "subnet.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    npz = np.load(exp / "subnet.npz")
    assert npz["classifier.weight_int"].dtype == np.int8


def test_export_bad_input(work, search_result):
    out, _, _ = search_result
    base = [*_supernet(work), *DATA_ARGS, "--out-dir", str(work / "bad")]
    with pytest.raises(ValueError, match=r"pass --index 0\.\."):
        _cli(export, [*base, "--subnets", str(out)])
    cfg = json.loads(out.read_text())["front"][0]["config"]
    wrong = work / "wrong.json"
    wrong.write_text(json.dumps({**cfg, "ks": cfg["ks"] + [3, 3]}))  # a config of a deeper supernet
    with pytest.raises(ValueError, match="ks: expected 10 values"):
        _cli(export, [*base, "--subnets", str(wrong)])
    wrong.write_text(json.dumps({**cfg, "w_bits": [5] + cfg["w_bits"][1:]}))
    with pytest.raises(ValueError, match=r"w_bits\[0\]=5 not in"):
        _cli(export, [*base, "--subnets", str(wrong)])
    with pytest.raises(FileNotFoundError, match="--subnets: file not found"):
        _cli(export, [*base, "--subnets", str(work / "missing.json")])
