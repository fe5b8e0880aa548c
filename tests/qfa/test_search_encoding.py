"""Subnet encoding (one-hot features, choice indices) and the collection sampler."""

from __future__ import annotations

import random

import numpy as np
import pytest

from qfa import SearchSpace, SubnetConfig
from qfa.cost import CostModel
from qfa.search.encoding import SubnetEncoder, translate_genes
from qfa.search.sampling import SamplingMix, sample_config, sample_rng
from qfa.search.space import space_from_dict, space_to_dict

SPACE = SearchSpace()  # the published space: 20 blocks, 65 quantized layers


def _configs(n: int, seed: int = 0) -> list[SubnetConfig]:
    return [sample_config(SPACE, sample_rng(seed, i)) for i in range(n)]


def test_feature_count_matches_the_published_layout():
    enc = SubnetEncoder(SPACE)
    # ks + e one-hot per block, 2-bit depth thermometer per stage, resolution, w/a bits of 64 layers.
    assert enc.n_features == 20 * 3 + 20 * 3 + 5 * 2 + 25 + 2 * 64 * 3
    assert enc.n_genes == 20 + 20 + 5 + 1 + 2 * 64


def test_layout_agrees_with_the_library():
    sp = space_from_dict(space_to_dict(SPACE))  # the encoder's view of the space: through its JSON form
    assert sp.qlayer_block == SPACE.qlayer_block and sp == SPACE
    rng = random.Random(3)
    enc = SubnetEncoder(SPACE)
    for _ in range(20):
        d = [rng.choice(SPACE.depth_list) for _ in range(SPACE.n_stages)]
        genes = np.zeros((1, enc.n_genes), dtype=np.int64)
        seg = enc.segments["d"]
        genes[0, seg.start : seg.stop] = [SPACE.depth_list.index(v) for v in d]
        _, block_on, _ = enc._activity(genes)
        assert np.flatnonzero(block_on[0]).tolist() == SPACE.active_blocks(d)


def test_round_trip_and_features_are_one_hot():
    enc = SubnetEncoder(SPACE)
    cfgs = _configs(200)
    genes = enc.to_index_matrix(cfgs)
    assert [enc.from_indices(g) for g in genes] == cfgs
    feats = enc.features(genes)
    assert feats.dtype == np.float32 and set(np.unique(feats)) <= {0.0, 1.0}
    for cfg, row in zip(cfgs, feats, strict=True):
        active = SPACE.active_blocks(cfg.d)
        ks = row[:60].reshape(20, 3)
        assert ks.sum(1).tolist() == [1.0 if b in active else 0.0 for b in range(20)]
        for b in active:
            assert ks[b, SPACE.ks_list.index(cfg.ks[b])] == 1.0
        therm = row[120:130].reshape(5, 2)
        assert therm.tolist() == [[float(v >= 3), float(v >= 4)] for v in cfg.d]
        res = row[130:155]
        assert res.sum() == 1.0 and res[SPACE.resolutions.index(cfg.resolution)] == 1.0


def test_inactive_blocks_do_not_change_the_features():
    enc = SubnetEncoder(SPACE)
    cfg = _configs(1, seed=5)[0]
    cfg.d = [2] * 5
    other = SubnetConfig.from_dict(cfg.to_dict())
    # Block 3 (stage 0, position 3) and its quantized layers 11..13 are inactive at depth 2.
    other.ks[3] = 3 if cfg.ks[3] != 3 else 7
    other.w_bits[11] = 2 if cfg.w_bits[11] != 2 else 4
    a, b = enc.encode([cfg, other])
    assert np.array_equal(a, b)
    ga, gb = enc.canonical(enc.to_index_matrix([cfg, other]))
    assert np.array_equal(ga, gb)
    other.ks[0] = 3 if cfg.ks[0] != 3 else 7  # block 0 is active: now they differ
    assert not np.array_equal(*enc.encode([cfg, other]))


@pytest.mark.parametrize(
    ("field", "index", "value", "message"),
    [
        ("ks", 3, 4, r"ks\[3\]=4 not in \(3, 5, 7\)"),
        ("w_bits", 10, 5, r"w_bits\[10\]=5 not in \(2, 3, 4\)"),
        ("d", 0, 1, r"d\[0\]=1 not in \(2, 3, 4\)"),
    ],
)
def test_bad_values_are_named(field, index, value, message):
    cfg = _configs(1)[0]
    getattr(cfg, field)[index] = value
    with pytest.raises(ValueError, match=message):
        SubnetEncoder(SPACE).encode([cfg])


def test_config_of_another_supernet_and_missing_resolution():
    small = SearchSpace(depth_list=(1, 2))  # 10 blocks: another supernet
    cfg = sample_config(small, sample_rng(0, 0))
    with pytest.raises(ValueError, match="ks has 10 entries, this search space needs 20"):
        SubnetEncoder(SPACE).encode([cfg])
    cfg = _configs(1)[0]
    cfg.resolution = None
    with pytest.raises(ValueError, match="no resolution"):
        SubnetEncoder(SPACE).encode([cfg])
    with pytest.raises(ValueError, match="depth_list"):
        SubnetEncoder(SPACE).check_space(small)


def test_bits_options_and_translation():
    with pytest.raises(ValueError, match=r"bit-width\(s\) \[5\] not in this supernet's bits_list"):
        SubnetEncoder(SPACE, bits_options=(2, 5))
    narrow, full = SubnetEncoder(SPACE, bits_options=(4, 2)), SubnetEncoder(SPACE)
    assert narrow.bits_options == (2, 4)
    genes = np.random.default_rng(0).integers(0, narrow.gene_upper + 1, size=(50, narrow.n_genes))
    cfgs = [narrow.from_indices(g) for g in genes]
    assert all(set(c.w_bits[:-1]) <= {2, 4} for c in cfgs)
    assert np.array_equal(translate_genes(genes, narrow, full), full.to_index_matrix(cfgs))
    with pytest.raises(ValueError, match="not encodable"):
        translate_genes(full.to_index_matrix(_configs(3)), full, narrow)


def test_vectorised_decode_feeds_the_cost_model():
    enc = SubnetEncoder(SPACE)
    cfgs = _configs(64, seed=9)
    for c in cfgs:
        SPACE.check_config(c)  # classifier bits follow the head rule
    genes = enc.to_index_matrix(cfgs)
    cm = CostModel(SPACE, n_classes=1000)
    a, b = cm.evaluate_batch(enc.to_arrays(genes)), cm.evaluate_batch(cfgs)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_sampling_is_deterministic_per_index_and_follows_the_mix():
    a = [sample_config(SPACE, sample_rng(7, i)) for i in range(400)]
    b = [sample_config(SPACE, sample_rng(7, i)) for i in reversed(range(400))][::-1]
    assert a == b  # sample i depends only on (seed, i), not on what was drawn before
    assert a != [sample_config(SPACE, sample_rng(8, i)) for i in range(400)]
    full_res = np.mean([c.resolution == 224 for c in a])
    full_depth = np.mean([c.d == [4] * 5 for c in a])
    uniform_bits = np.mean([len(set(c.w_bits[:-1] + c.a_bits[:-1])) == 1 for c in a])
    # Published mix 0.4 / 0.3 / 0.3 (plus a tiny chance from the uniform draw itself); 4-sigma bands.
    assert abs(full_res - 0.4) < 0.1 and abs(full_depth - 0.3) < 0.1 and abs(uniform_bits - 0.3) < 0.1
    none = [sample_config(SPACE, sample_rng(1, i), SamplingMix(0.0, 0.0, 0.0)) for i in range(100)]
    assert np.mean([c.resolution == 224 for c in none]) < 0.15
    with pytest.raises(ValueError, match="p_full_depth"):
        SamplingMix(p_full_depth=1.5)


def test_json_form_of_a_space_round_trips_and_checks_its_layout():
    small = SearchSpace(ks_list=(3, 5), expand_list=(2, 3), depth_list=(1, 2), bits_list=(3, 4), width_mult=0.25)
    data = space_to_dict(small)
    assert data["n_blocks"] == 10 and data["n_qlayers"] == 2 + 3 * 10 + 3 and data["width_mult"] == 0.25
    assert space_from_dict(data) == small and space_to_dict(data) == data
    for key, bad in (("n_qlayers", 36), ("block_stage", [0] * 10), ("n_stages", 4)):
        with pytest.raises(ValueError, match=f"space.{key}="):
            space_from_dict({**data, key: bad})
    with pytest.raises(ValueError, match="missing field"):
        space_from_dict({k: v for k, v in data.items() if k != "n_blocks"})


def test_space_layout_fields_agree_with_each_other():
    for b in range(SPACE.n_blocks):
        q = SPACE.block_first_qlayer[b]
        assert SPACE.qlayer_names[q] == f"blocks.{b + 1}.conv.inverted_bottleneck"
        assert SPACE.qlayer_block[q : q + 3] == (b, b, b)
        assert b in SPACE.stage_blocks(SPACE.block_stage[b])
        assert SPACE.stage_blocks(SPACE.block_stage[b])[SPACE.block_position[b]] == b
    rng = random.Random(5)
    d = np.array([[rng.choice(SPACE.depth_list) for _ in range(SPACE.n_stages)] for _ in range(50)])
    mask = SPACE.active_block_mask(d)
    assert [np.flatnonzero(row).tolist() for row in mask] == [SPACE.active_blocks(list(row)) for row in d]
