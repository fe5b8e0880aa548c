"""SubnetConfig / SearchSpace: JSON, validation errors, sampling, sandwich and bit-width rules, bad input."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from qfa import QFAMobileNetV3, SearchSpace, SubnetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> QFAMobileNetV3:
    return QFAMobileNetV3(n_classes=10, width_mult=0.25)


def _space_phase0() -> SearchSpace:
    return SearchSpace(bits_list=(2, 3, 4, 32))


def test_json_round_trip():
    space = SearchSpace()
    cfg = space.sample(random.Random(3))
    cfg.resolution = 160
    text = cfg.to_json()
    back = SubnetConfig.from_json(text)
    assert back == cfg and back.validate(space) is back
    assert json.loads(text)["resolution"] == 160
    assert SubnetConfig.from_dict(cfg.to_dict()) == cfg
    # numpy integers are accepted and stored as Python ints
    as_np = SubnetConfig(np.array(cfg.ks), cfg.e, cfg.d, cfg.w_bits, cfg.a_bits)
    assert as_np.ks == cfg.ks and all(type(v) is int for v in as_np.ks)


@pytest.mark.parametrize(
    "field, index, value, message",
    [
        ("ks", 3, 4, "ks[3]=4 not in (3, 5, 7)"),
        ("e", 0, 5, "e[0]=5 not in (3, 4, 6)"),
        ("d", 4, 1, "d[4]=1 not in (2, 3, 4)"),
        ("w_bits", 7, 5, "w_bits[7]=5 not in (2, 3, 4, 32)"),
        ("a_bits", 64, 4, "a_bits[64]=4 not in (8, 32)"),
    ],
)
def test_validation_errors_name_the_field(field, index, value, message):
    space = SearchSpace()
    cfg = space.sample(random.Random(0))
    getattr(cfg, field)[index] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.validate(space)


@pytest.mark.parametrize("field, n", [("ks", 19), ("e", 21), ("d", 4), ("w_bits", 64), ("a_bits", 66)])
def test_validation_errors_on_lengths(field, n):
    space = SearchSpace()
    cfg = space.sample(random.Random(0))
    setattr(cfg, field, [getattr(cfg, field)[0]] * n)
    with pytest.raises(ValueError, match=rf"^{field}: expected \d+ values .* got {n}"):
        cfg.validate(space)


def test_type_errors_and_bad_dicts():
    with pytest.raises(TypeError, match=r"ks\[1\] must be an int"):
        SubnetConfig([3, 5.0], [3], [2], [2], [2])
    with pytest.raises(TypeError, match=r"e\[0\] must be an int"):
        SubnetConfig([3], [True], [2], [2], [2])
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\], missing keys \['d'\]"):
        SubnetConfig.from_dict({"ks": [3], "e": [3], "w_bits": [2], "a_bits": [2], "bogus": 1})
    with pytest.raises(ValueError, match="resolution=0"):
        SearchSpace().make_config(resolution=0)


def test_space_options_validated():
    with pytest.raises(ValueError, match=r"ks_list\[1\]=4: must be an odd int"):
        SearchSpace(ks_list=(3, 4))
    with pytest.raises(ValueError, match=r"bits_list\[0\]=1: must be in 2..8 or 32"):
        SearchSpace(bits_list=(1, 2))
    with pytest.raises(ValueError, match="expand_list has duplicates"):
        SearchSpace(expand_list=(3, 3))
    with pytest.raises(ValueError, match="width_mult must be a positive number"):
        QFAMobileNetV3(width_mult=0)
    with pytest.raises(ValueError, match="n_classes must be a positive int"):
        QFAMobileNetV3(n_classes=0, width_mult=0.25)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        QFAMobileNetV3(dropout=1.5, width_mult=0.25)


def test_sampling_is_deterministic_and_covers_the_options():
    space = SearchSpace()
    a = [space.sample(random.Random(seed)) for seed in range(5)]
    b = [space.sample(random.Random(seed)) for seed in range(5)]
    assert a == b and len({c.to_json() for c in a}) == 5
    rng = random.Random(1)
    many = [space.sample(rng) for _ in range(200)]
    for cfg in many:
        cfg.validate(space)
        assert cfg.w_bits[-1] == cfg.a_bits[-1] == 8  # no 32 in phase 1: the classifier is W8A8
    assert {v for c in many for v in c.ks} == {3, 5, 7}
    assert {v for c in many for v in c.e} == {3, 4, 6}
    assert {v for c in many for v in c.d} == {2, 3, 4}
    assert {v for c in many for v in c.w_bits[:-1]} == {2, 3, 4}
    assert {v for c in many for v in c.a_bits[:-1]} == {2, 3, 4}


def test_phase0_rules_for_32_bits():
    space = _space_phase0()
    rng = random.Random(7)
    pairs, head = [], []
    for _ in range(400):
        cfg = space.sample(rng)
        cfg.validate(space)
        pairs += list(zip(cfg.w_bits[:-1], cfg.a_bits[:-1], strict=True))
        head.append((cfg.w_bits[-1], cfg.a_bits[-1]))
    # never exactly one of (w, a) at 32
    assert all((w == 32) == (a == 32) for w, a in pairs)
    # both-32 pairs: 1/4 drawn as (32, 32) plus 0.2 of the 6/16 mixed draws -> 1/16 + 0.2 * 6/16 = 0.1375
    frac = sum(w == 32 for w, _ in pairs) / len(pairs)
    assert abs(frac - 0.1375) < 0.01, frac
    assert set(head) <= {(8, 8), (32, 32)}
    # classifier: (32, 32) drawn with 1/16, mixed with 6/16 of which 0.666 -> 32: 1/16 + 0.666 * 6/16 = 0.3123
    head_frac = sum(w == 32 for w, _ in head) / len(head)
    assert abs(head_frac - 0.3123) < 0.06, head_frac


@pytest.mark.parametrize("kind", ["min", "max"])
def test_sandwich_configs(kind):
    space = _space_phase0()
    rng = random.Random(11)
    seen_ks, seen_bits = set(), set()
    for _ in range(40):
        cfg = space.sandwich(kind, rng)
        cfg.validate(space)
        assert cfg.e == [3 if kind == "min" else 6] * 20 and cfg.d == [2 if kind == "min" else 4] * 5
        assert len(set(cfg.ks)) == 1
        assert len(set(cfg.w_bits[:-1])) == 1 and cfg.w_bits == cfg.a_bits
        b = cfg.w_bits[0]
        assert cfg.w_bits[-1] == (32 if b == 32 else 8)
        seen_ks.add(cfg.ks[0])
        seen_bits.add(b)
    assert seen_ks == {3, 5, 7} and seen_bits == {2, 3, 4, 32}
    with pytest.raises(ValueError, match='kind must be "min" or "max"'):
        space.sandwich("mid", rng)


def test_rng_must_be_random_random(tiny):
    with pytest.raises(TypeError, match="rng must be a random.Random"):
        tiny.sample_active_subnet(np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be a random.Random"):
        tiny.set_sandwich_subnet("max", 0)


def test_set_active_subnet_scalars_lists_and_head_rule(tiny):
    space = tiny.space
    tiny.set_active_subnet(ks=5, e=4, d=3, w_bits=2, a_bits=3)
    cfg = tiny.get_active_config()
    assert cfg.ks == [5] * 20 and cfg.e == [4] * 20 and cfg.d == [3] * 5 and cfg.resolution is None
    assert cfg.w_bits == [2] * 64 + [8] and cfg.a_bits == [3] * 64 + [8]
    assert tiny.first_conv.w_bits == tiny.first_conv.a_bits == 32  # the stem is never quantized
    assert tiny.classifier.w_bits == 8 and tiny.classifier._w_key == "8"
    ks = [3, 5, 7, 3] * 5
    tiny.set_active_subnet(ks=ks)  # None keeps the rest
    cfg2 = tiny.get_active_config()
    assert cfg2.ks == ks and cfg2.e == cfg.e and cfg2.w_bits == cfg.w_bits
    assert [b.conv.depth_conv.active_kernel_size for b in tiny.blocks[1:]] == ks
    tiny.set_active_subnet(w_bits=32, a_bits=32)
    assert tiny.get_active_config().w_bits[-1] == 32
    fp = tiny.set_full_precision()
    assert fp == space.full_precision() and fp.ks == [7] * 20 and set(fp.w_bits) == {32}
    # the returned config is a copy
    got = tiny.get_active_config()
    got.ks[0] = 3
    assert tiny.get_active_config().ks[0] == 7


def test_bad_set_active_subnet_changes_nothing(tiny):
    tiny.set_active_subnet(ks=3, e=3, d=2, w_bits=4, a_bits=4)
    before = tiny.get_active_config()
    with pytest.raises(ValueError, match=r"ks\[0\]=4 not in \(3, 5, 7\)"):
        tiny.set_active_subnet(ks=4, e=6)
    with pytest.raises(ValueError, match=r"^d: expected 5 values \(one per stage\), got 4"):
        tiny.set_active_subnet(d=[2, 3, 4, 2])
    with pytest.raises(ValueError, match=r"w_bits\[3\]=7 not in"):
        tiny.set_active_subnet(w_bits=[2, 2, 2, 7] + [2] * 61)
    with pytest.raises(TypeError, match="ks must be an int or a list of ints"):
        tiny.set_active_subnet(ks=True)
    assert tiny.get_active_config() == before
    assert tiny.blocks[1].conv.active_expand == 3


def test_wrong_input_is_rejected(tiny):
    tiny.eval()
    with pytest.raises(ValueError, match=r"input must be an \(N, 3, H, W\) image batch, got \(2, 1, 32, 32\)"):
        tiny(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"got \(3, 32, 32\)"):
        tiny(torch.randn(3, 32, 32))


def test_bits_without_a_quantizer_are_rejected():
    model = QFAMobileNetV3(n_classes=4, width_mult=0.25, bits_list=(2, 4))
    assert sorted(model.classifier.w_quantizer.keys(), key=int) == ["2", "4", "8"]
    with pytest.raises(ValueError, match=r"w_bits\[0\]=3 not in \(2, 4, 32\)"):
        model.set_active_subnet(w_bits=3)
