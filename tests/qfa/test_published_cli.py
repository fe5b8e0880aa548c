"""The published metrics on the command line: ``qfa cost``, ``qfa search --metric / --flops-lut``,
``qfa collect --flops-lut``, the shipped published Pareto front, and their one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import qfa
from qfa.checkpoint import save_supernet
from qfa.cli import entry, main
from qfa.cost import CostModel
from qfa.published import PARETO_NAME, pareto_path
from qfa.search.encoding import SubnetEncoder
from qfa.search.nsga import SEARCH_METRICS
from qfa.search.predictor import AccuracyPredictor, save_predictor
from qfa.search.records import read_records
from qfa.train.evaluation import named_configs

DATA = Path(__file__).resolve().parents[1] / "data"
RESOLUTIONS = (32, 36)  # the published formula needs >= 32
TINY = dict(n_classes=10, width_mult=0.25, ks_list=(3, 5), expand_list=(2, 3), depth_list=(1, 2), dropout=0.0)
DATA_ARGS = ["--data", "digits", "--batch-size", "512", "--calib-batches", "1", "--calib-batch-size", "64"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny supernet (resolutions >= 32), an untrained predictor of its space, and FLOPs tables."""
    d = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    model = qfa.QFAMobileNetV3(**TINY, resolutions=RESOLUTIONS)
    save_supernet(model, d / "tiny.pt")
    save_predictor(d / "pred.pt", AccuracyPredictor(SubnetEncoder(model.space), hidden=(16, 16)))
    assert main(["cost", "--checkpoint", str(d / "tiny.pt"), "--write-lut", str(d / "formula.json")]) == 0
    # A user table that differs from the formula: the expand convs of the elastic blocks cost 50x.
    table = json.loads((d / "formula.json").read_text())
    for entry_ in table.values():
        for block in entry_["mobile_inverted_blocks"][1:]:
            for v in block.values():
                v[0] += 49 * v[1]
                v[1] *= 50
    (d / "user.json").write_text(json.dumps(table))
    return {p.stem: p for p in d.iterdir()} | {"dir": d}


def _one_line_error(capsys, argv: list[str], command: str) -> str:
    capsys.readouterr()  # drop earlier output
    assert entry(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qfa {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- qfa cost


def test_cost_of_the_published_pareto_front(capsys):
    assert main(["cost", "--subnets", PARETO_NAME]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        "under 20 MLUT-FLOPs: 88 of 181 by published_lut_flops (the published table), "
        "77 of 181 by lut_flops (ours, BitOPs / 64)"
    )
    assert len(out) == 2 + 181 + 1  # header, rule, one row per subnet, summary
    assert out[0].split()[:4] == ["subnet", "res", "MACs", "(M)"]


def test_cost_json_rows_equal_the_cost_model(tmp_path):
    subnets = tmp_path / "subnets.jsonl"
    recs = DATA.joinpath("qfa-published-pareto.jsonl").read_text().splitlines()[:5]
    subnets.write_text("\n".join(recs) + "\n")
    out = tmp_path / "costs.json"
    assert main(["cost", "--subnets", str(subnets), "--resolution", "160", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cost = CostModel(qfa.SearchSpace())
    for r, line in zip(rows, recs, strict=True):
        cfg = qfa.SubnetConfig.from_dict({**json.loads(line)["config"], "resolution": 160})
        assert r["res"] == 160
        for metric in ("macs", "params", "bitops", "lut_flops", "published_lut_flops"):
            assert r[metric] == getattr(cost, metric)(cfg)


def test_write_lut_is_the_published_table_and_converts_npy(tmp_path, capsys):
    published = json.loads(DATA.joinpath("qfa-published-lut-flops.json").read_text())
    formula = tmp_path / "formula.json"
    assert main(["cost", "--write-lut", str(formula)]) == 0
    assert formula.read_bytes() == DATA.joinpath("qfa-published-lut-flops.json").read_bytes()
    # the published pickled .npy: refused without --allow-pickle, converted to the same JSON with it
    raw = {
        int(r): {
            "mobile_inverted_blocks": [
                {tuple(map(int, k.split(","))): tuple(v) for k, v in b.items()} for b in e["mobile_inverted_blocks"]
            ],
            "other_blocks": {int(k): v for k, v in e["other_blocks"].items()},
        }
        for r, e in published.items()
    }
    npy = tmp_path / "lut_flops_1.20.npy"
    np.save(npy, raw, allow_pickle=True)
    converted = tmp_path / "converted.json"
    err = _one_line_error(capsys, ["cost", "--flops-lut", str(npy), "--write-lut", str(converted)], "cost")
    assert "--allow-pickle" in err and not converted.exists()
    assert main(["cost", "--flops-lut", str(npy), "--allow-pickle", "--write-lut", str(converted)]) == 0
    assert json.loads(converted.read_text()) == published


def test_cost_errors_are_one_line(tmp_path, capsys, files):
    bad = tmp_path / "bad.json"
    table = json.loads(files["formula"].read_text())
    del table["36"]
    bad.write_text(json.dumps(table))
    argv = ["cost", "--subnets", "min", "--checkpoint", str(files["tiny"]), "--flops-lut", str(bad)]
    err = _one_line_error(capsys, argv, "cost")
    assert "no entries for resolution(s) 36" in err
    err = _one_line_error(capsys, ["cost", "--subnets", "min", "--flops-lut", str(files["formula"])], "cost")
    assert "no entries for any of the supernet's resolutions 128..224 step 4 (the table has 32, 36" in err
    table = {str(r): json.loads(files["formula"].read_text())["32"] for r in qfa.SearchSpace().resolutions}
    bad.write_text(json.dumps(table))  # the tiny supernet's blocks at the published resolutions
    err = _one_line_error(capsys, ["cost", "--subnets", "min", "--flops-lut", str(bad)], "cost")
    assert "resolution 128: 'mobile_inverted_blocks' has 11 entries, expected 21" in err
    assert "--subnets is required" in _one_line_error(capsys, ["cost"], "cost")
    assert "only meaningful with --flops-lut" in _one_line_error(
        capsys, ["cost", "--subnets", "min", "--allow-pickle"], "cost"
    )


def test_published_pareto_ships_with_the_package():
    assert pareto_path().read_bytes() == DATA.joinpath("qfa-published-pareto.jsonl").read_bytes()
    configs = named_configs(qfa.SearchSpace(), PARETO_NAME, None)  # what qfa eval --subnets published-pareto reads
    recs = read_records(pareto_path())
    assert len(configs) == len(recs) == 181
    assert all(cfg.to_dict() == r["config"] for (_, cfg), r in zip(configs, recs, strict=True))


# ----------------------------------------------------------------------------- qfa search


def _search(files, tmp_path, *extra: str) -> dict:
    out = tmp_path / "front.json"
    argv = ["search", "--checkpoint", str(files["tiny"]), "--predictor", str(files["pred"]), "--out", str(out)]
    argv += ["--population", "12", "--generations", "4", "--no-progress", "--device", "cpu", *extra]
    assert main(argv) == 0
    assert (tmp_path / "front.png").is_file()
    return json.loads(out.read_text())


@pytest.mark.parametrize("metric", SEARCH_METRICS)
def test_search_with_each_metric(files, tmp_path, metric):
    model = qfa.checkpoint.load_supernet(files["tiny"])
    cost = CostModel(model)
    rng = random.Random(0)
    sample = cost.evaluate_batch([model.space.sample(rng) for _ in range(64)])
    limit = float(np.median(sample[metric])) / 1e6
    result = _search(files, tmp_path, "--metric", metric, "--max-mflops", f"{limit}", "--no-reevaluate")
    assert result["metric"] == result["settings"]["metric"] == result["constraints"]["metric"] == metric
    front = result["front"]
    assert front
    costs = np.array([e[metric] for e in front])
    predicted = np.array([e["predicted"] for e in front])
    assert np.all(costs <= limit * 1e6)
    # non-dominated in (predicted up, this metric down): sorted by the metric, accuracy rising with it
    assert np.all(np.diff(costs) >= 0) and np.all(np.diff(predicted) > 0)
    configs = [qfa.SubnetConfig.from_dict(e["config"]) for e in front]
    np.testing.assert_array_equal(costs, cost.evaluate_batch(configs)[metric])
    assert {"lut_flops", "published_lut_flops", "bitops", "macs", "params"} <= set(front[0])


def test_search_with_a_user_table_and_reevaluation(files, tmp_path):
    samples = tmp_path / "samples.jsonl"
    argv = ["collect", "--checkpoint", str(files["tiny"]), "--out", str(samples), "--num-samples", "2"]
    assert main([*argv, "--device", "cpu", "--no-progress", *DATA_ARGS]) == 0
    extra = ["--flops-lut", str(files["user"]), "--max-reevaluate", "2", "--samples", str(samples), *DATA_ARGS]
    result = _search(files, tmp_path, *extra)
    assert result["metric"] == "published_lut_flops"  # the default with --flops-lut
    assert result["flops_lut"] == f"--flops-lut {files['user']}"
    model = qfa.checkpoint.load_supernet(files["tiny"])
    user, formula = CostModel(model, flops_lut=files["user"]), CostModel(model)
    configs = [qfa.SubnetConfig.from_dict(e["config"]) for e in result["candidates"]]
    scores = np.array([e["published_lut_flops"] for e in result["candidates"]])
    np.testing.assert_array_equal(scores, user.evaluate_batch(configs)["published_lut_flops"])
    assert np.all(scores > formula.evaluate_batch(configs)["published_lut_flops"])
    measured = [e for e in result["candidates"] if "measured_top1" in e]
    assert 1 <= len(measured) <= 2 and result["reevaluated"]


def test_search_errors_are_one_line(files, tmp_path, capsys):
    base = ["search", "--checkpoint", str(files["tiny"]), "--predictor", str(files["pred"])]
    base += ["--out", str(tmp_path / "f.json"), "--device", "cpu", "--no-progress"]
    err = _one_line_error(capsys, [*base, "--metric", "flops"], "search")
    assert "--metric: unknown metric 'flops' (use one of lut_flops, published_lut_flops, bitops, macs)" in err
    err = _one_line_error(capsys, [*base, "--flops-lut", str(tmp_path / "missing.json")], "search")
    assert "missing.json: file not found" in err
    broken = json.loads(files["formula"].read_text())
    del broken["32"]["mobile_inverted_blocks"][3]["5,3"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    err = _one_line_error(capsys, [*base, "--flops-lut", str(tmp_path / "broken.json")], "search")
    assert "resolution 32, block 3: lacks the (k, e) entries (5, 3)" in err
    assert not (tmp_path / "f.json").exists()
    # a supernet whose resolutions are below the formula's domain
    small = tmp_path / "small.pt"
    save_supernet(qfa.QFAMobileNetV3(**TINY, resolutions=(8, 16)), small)
    save_predictor(
        tmp_path / "p.pt", AccuracyPredictor(SubnetEncoder(qfa.QFAMobileNetV3(**TINY, resolutions=(8, 16)).space))
    )
    argv = [
        "search",
        "--checkpoint",
        str(small),
        "--predictor",
        str(tmp_path / "p.pt"),
        "--out",
        str(tmp_path / "f.json"),
    ]
    err = _one_line_error(capsys, [*argv, "--metric", "published_lut_flops", "--device", "cpu"], "search")
    assert "needs resolutions >= 32" in err


# ----------------------------------------------------------------------------- qfa collect


def test_collect_records_both_lut_metrics_and_a_user_table(files, tmp_path, capsys):
    model = qfa.checkpoint.load_supernet(files["tiny"])
    formula, user = CostModel(model), CostModel(model, flops_lut=files["user"])
    for name, extra, cost in (("f", [], formula), ("u", ["--flops-lut", str(files["user"])], user)):
        out = tmp_path / f"{name}.jsonl"
        argv = ["collect", "--checkpoint", str(files["tiny"]), "--out", str(out), "--num-samples", "2"]
        assert main([*argv, "--device", "cpu", "--no-progress", *DATA_ARGS, *extra]) == 0
        recs = read_records(out)
        assert len(recs) == 2
        for r in recs:
            cfg = qfa.SubnetConfig.from_dict(r["config"])
            for metric in ("lut_flops", "published_lut_flops", "bitops", "macs", "params"):
                assert r[metric] == getattr(cost, metric)(cfg)
    assert (
        read_records(tmp_path / "u.jsonl")[0]["published_lut_flops"]
        > read_records(tmp_path / "f.jsonl")[0]["published_lut_flops"]
    )
    # a pickled table without --allow-pickle: one line, before any data is loaded, nothing written
    npy = tmp_path / "t.npy"
    np.save(npy, {}, allow_pickle=True)
    out = tmp_path / "n.jsonl"
    argv = ["collect", "--checkpoint", str(files["tiny"]), "--out", str(out), "--num-samples", "1"]
    err = _one_line_error(capsys, [*argv, "--device", "cpu", "--flops-lut", str(npy)], "collect")
    assert "is a pickle" in err and "--allow-pickle" in err and not out.exists()
