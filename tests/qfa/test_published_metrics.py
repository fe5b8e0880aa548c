"""The published LUT-FLOPs metric: its closed formula against the published table (every number), the
published Pareto set's scores, user tables in both layouts, and their errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from qfa import QFAMobileNetV3, SearchSpace, SubnetConfig
from qfa.cost import CostModel
from qfa.flops_lut import normalise_table, read_table, table_to_json

DATA = Path(__file__).resolve().parents[1] / "data"
TABLE = DATA / "qfa-published-lut-flops.json"
PARETO = DATA / "qfa-published-pareto.jsonl"


@pytest.fixture(scope="module")
def published_table() -> dict:
    return json.loads(TABLE.read_text())


@pytest.fixture(scope="module")
def pareto() -> tuple[list[SubnetConfig], np.ndarray]:
    recs = [json.loads(line) for line in PARETO.read_text().splitlines() if line.strip()]
    return [SubnetConfig.from_dict(r["config"]) for r in recs], np.array([r["published_lut_mflops"] for r in recs])


def test_formula_reproduces_every_number_of_the_published_table(published_table):
    cost = CostModel(SearchSpace(), n_classes=1000)
    resolutions = tuple(int(r) for r in published_table)
    assert resolutions == tuple(range(128, 225, 4))
    mine = table_to_json(cost.published.table(resolutions))
    numbers = 0
    for r, entry in published_table.items():
        blocks, ours = entry["mobile_inverted_blocks"], mine[r]["mobile_inverted_blocks"]
        assert len(ours) == len(blocks) == 21
        for i, (b, o) in enumerate(zip(blocks, ours, strict=True)):
            assert set(o) == set(b), (r, i)
            for ke, values in b.items():
                assert o[ke] == values, (r, i, ke)  # exact: both are integers of FLOPs / 1e6
                numbers += len(values)
        assert mine[r]["other_blocks"] == entry["other_blocks"], r
        numbers += len(entry["other_blocks"])
    assert numbers == 18_400


def test_pareto_set_scores_equal_the_published_ones(pareto):
    configs, published = pareto
    assert len(configs) == 181
    cost = CostModel(SearchSpace(), n_classes=1000)
    out = cost.evaluate_batch(configs)
    np.testing.assert_allclose(out["published_lut_flops"] / 1e6, published, rtol=1e-9, atol=0)
    assert cost.published_lut_flops(configs[7]) == out["published_lut_flops"][7]
    # the two metrics disagree as the data README says: 88 vs 77 under 20 MFLOPs, ours 0.997-1.233x
    assert int(np.sum(out["published_lut_flops"] < 20e6)) == 88
    assert int(np.sum(out["lut_flops"] < 20e6)) == 77
    ratio = out["lut_flops"] / out["published_lut_flops"]
    assert 0.99 < ratio.min() < 1.0 < 1.2 < ratio.max() < 1.24


def test_published_rule_details():
    """Bits are capped at 8; the classifier counts at W8A8 and the stem at full cost whatever the config;
    inactive blocks add nothing; resolutions outside the table's 128..224 come from the formula."""
    space = SearchSpace(bits_list=(2, 3, 4, 32))
    cost = CostModel(space, n_classes=1000)
    cfg = space.sample(random.Random(3))
    cfg.resolution = 160
    base = cost.published_lut_flops(cfg)
    at8 = SubnetConfig(cfg.ks, cfg.e, cfg.d, [8] * space.n_qlayers, [8] * space.n_qlayers, 160)
    at32 = SubnetConfig(cfg.ks, cfg.e, cfg.d, [32] * space.n_qlayers, [32] * space.n_qlayers, 160)
    assert cost.published_lut_flops(at8) == cost.published_lut_flops(at32) > base
    # at 8 bits everywhere every entry counts in full: the sum of the totals of the active blocks and others
    entries = cost.published.entries(160)
    blocks = entries["mobile_inverted_blocks"]
    active = space.active_blocks(cfg.d)
    expected = blocks[0][(3, 1)][0] + sum(blocks[b + 1][(cfg.ks[b], cfg.e[b])][0] for b in active)
    expected += sum(entries["other_blocks"].values())
    assert cost.published_lut_flops(at8) == pytest.approx(expected * 1e6, rel=1e-12)
    # the classifier's bits do not matter (W8A8)
    low_cls = SubnetConfig(cfg.ks, cfg.e, cfg.d, cfg.w_bits[:-1] + [32], cfg.a_bits[:-1] + [32], 160)
    assert cost.published_lut_flops(low_cls) == base
    # a block beyond the stage depth adds nothing: changing its k / e / bits leaves the score
    hidden = next(b for b in range(space.n_blocks) if b not in active)
    ks = list(cfg.ks)
    ks[hidden] = 7 if ks[hidden] != 7 else 3
    assert cost.published_lut_flops(SubnetConfig(ks, cfg.e, cfg.d, cfg.w_bits, cfg.a_bits, 160)) == base
    # any resolution >= 32
    odd = SubnetConfig(cfg.ks, cfg.e, cfg.d, cfg.w_bits, cfg.a_bits, 233)
    assert cost.published_lut_flops(odd) > base
    with pytest.raises(ValueError, match="needs resolution >= 32"):
        cost.published_lut_flops(SubnetConfig(cfg.ks, cfg.e, cfg.d, cfg.w_bits, cfg.a_bits, 31))


def test_batch_equals_single_and_model_equals_space():
    model = QFAMobileNetV3(n_classes=10, width_mult=0.5, resolutions=(32, 48, 64))
    by_model, by_space = CostModel(model), CostModel(model.space, n_classes=10)
    rng = random.Random(0)
    configs = [model.space.sample(rng) for _ in range(12)]
    for c in configs:
        c.resolution = rng.choice(model.space.resolutions)
    a, b = by_model.evaluate_batch(configs), by_space.evaluate_batch(configs)
    assert set(a) == set(b) == {"macs", "params", "bitops", "lut_flops", "published_lut_flops"}
    np.testing.assert_array_equal(a["published_lut_flops"], b["published_lut_flops"])
    for i, c in enumerate(configs):
        assert by_model.published_lut_flops(c) == a["published_lut_flops"][i]


def test_formula_undefined_is_a_clear_error():
    tiny = SearchSpace(resolutions=(8, 16, 24))
    cost = CostModel(tiny, n_classes=10)
    assert "published_lut_flops" not in cost.evaluate_batch([tiny.sample(random.Random(0))])
    assert cost.metrics == ("macs", "params", "bitops", "lut_flops")
    with pytest.raises(ValueError, match="needs resolutions >= 32"):
        cost.published_lut_flops(tiny.sample(random.Random(0)))
    # a network that is not the MobileNetV3 template of its space
    model = QFAMobileNetV3(n_classes=10, width_mult=0.5)

    class Other:
        space = model.space
        arch = dataclasses.replace(model.arch, stem_channels=model.arch.stem_channels + 8)

    other = CostModel(Other())
    with pytest.raises(ValueError, match="only for the MobileNetV3 template"):
        other.published_lut_flops(model.space.sample(random.Random(0)))


# ----------------------------------------------------------------------------- user tables


def test_user_table_json_and_npy(tmp_path, published_table, pareto):
    configs, published = pareto
    space = SearchSpace()
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(published_table))
    from_json = CostModel(space, flops_lut=path).evaluate_batch(configs)["published_lut_flops"]
    np.testing.assert_allclose(from_json / 1e6, published, rtol=1e-9, atol=0)
    # the published .npy layout: int resolutions, (k, e) tuple keys, int other keys, pickled
    raw = {
        int(r): {
            "mobile_inverted_blocks": [
                {tuple(map(int, k.split(","))): v for k, v in b.items()} for b in e["mobile_inverted_blocks"]
            ],
            "other_blocks": {int(k): v for k, v in e["other_blocks"].items()},
        }
        for r, e in published_table.items()
    }
    npy = tmp_path / "lut_flops_1.20.npy"
    np.save(npy, raw, allow_pickle=True)
    with pytest.raises(ValueError, match=r"pickle.*--allow-pickle.*--write-lut"):
        CostModel(space, flops_lut=npy)
    from_npy = CostModel(space, flops_lut=npy, allow_pickle=True).evaluate_batch(configs)["published_lut_flops"]
    np.testing.assert_array_equal(from_npy, from_json)
    assert read_table(npy, allow_pickle=True) == normalise_table(published_table)
    # a user's own numbers are used: doubling every entry doubles every score
    doubled = copy.deepcopy(published_table)
    for e in doubled.values():
        e["mobile_inverted_blocks"] = [
            {k: [2 * x for x in v] for k, v in b.items()} for b in e["mobile_inverted_blocks"]
        ]
        e["other_blocks"] = {k: 2 * v for k, v in e["other_blocks"].items()}
    twice = CostModel(space, flops_lut=doubled).evaluate_batch(configs)["published_lut_flops"]
    np.testing.assert_allclose(twice, 2 * from_json, rtol=1e-12)


def _broken(table: dict, how: str) -> dict:
    t = copy.deepcopy(table)
    if how == "resolution":
        del t["200"], t["132"]
    elif how == "ke":
        del t["224"]["mobile_inverted_blocks"][5]["7,6"]
        del t["224"]["mobile_inverted_blocks"][5]["5,6"]
    elif how == "block0":
        del t["128"]["mobile_inverted_blocks"][0]["3,1"]
    elif how == "blocks":
        t["160"]["mobile_inverted_blocks"].pop()
    elif how == "other":
        del t["176"]["other_blocks"]["23"]
    elif how == "value":
        t["224"]["mobile_inverted_blocks"][3]["3,4"] = [1.0, 2.0]
    elif how == "key":
        t["224"]["mobile_inverted_blocks"][3]["k3e4"] = [1.0, 0.0, 0.0, 0.0]
    return t


@pytest.mark.parametrize(
    "how, message",
    [
        ("resolution", r"no entries for resolution\(s\) 132, 200 \(the supernet uses 128\.\.224 step 4"),
        ("ke", r"resolution 224, block 5: lacks the \(k, e\) entries \(5, 6\), \(7, 6\)"),
        ("block0", r"resolution 128, block 0: lacks the \(k, e\) entry \(3, 1\)"),
        ("blocks", r"resolution 160: 'mobile_inverted_blocks' has 20 entries, expected 21"),
        ("other", r"resolution 176: 'other_blocks' lacks 23 \(feature mix\)"),
        ("value", r"resolution 224, block 3, 3,4: expected \[total, expand, depthwise, project\] MFLOPs"),
        ("key", r"resolution 224, block 3: key 'k3e4' is not a \(k, e\) pair"),
    ],
)
def test_bad_tables_name_what_is_missing(tmp_path, published_table, how, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(published_table, how)))
    with pytest.raises(ValueError, match=message) as err:
        CostModel(SearchSpace(), flops_lut=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_tables(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON table"):
        read_table(bad)
    with pytest.raises(FileNotFoundError, match="file not found"):
        read_table(tmp_path / "missing.json")
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a non-empty mapping"):
        read_table(bad)
