"""Structure of the published QFA MobileNetV3 w1.2 supernet: widths, blocks, quantizer inventory."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import pytest
import torch

from bquant_kernels import recalibrate
from qfa import QFAMobileNetV3, SearchSpace
from qfa.checkpoint import published_quantizer_name
from qfa.nn import DynamicQDepthwiseConv2d, make_divisible

DATA = Path(__file__).resolve().parents[1] / "data"  # copies of the published layout tables
QFA_TSV = DATA / "qfa-published-state-dict.tsv"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def published() -> QFAMobileNetV3:
    return QFAMobileNetV3()


def _tsv_keys(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(r["key"], tuple(int(s) for s in r["shape"].strip("()").split(",") if s.strip())) for r in rows]


def test_make_divisible_widths():
    base = [16, 24, 40, 80, 112, 160, 960, 1280]
    assert [make_divisible(w * 1.2, 8) for w in base] == [24, 32, 48, 96, 136, 192, 1152, 1536]
    assert make_divisible(19.2, 8) == 24  # 16 would be below 90% of 19.2


def test_widths_stages_and_blocks(published):
    arch = published.arch
    assert (arch.stem_channels, arch.block0_channels) == (24, 24)
    assert (arch.final_expand_channels, arch.feature_mix_channels, arch.n_classes) == (1152, 1536, 1000)
    assert len(published.blocks) == 21
    stage_out = [32, 48, 96, 136, 192]
    stage_stride = [2, 2, 2, 1, 2]
    stage_se = [False, True, False, True, True]
    stage_act = ["relu", "relu", "h_swish", "h_swish", "h_swish"]
    for b, spec in enumerate(arch.blocks):
        s, first = b // 4, b % 4 == 0
        assert spec.stage == s
        assert spec.out_channels == stage_out[s]
        assert spec.stride == (stage_stride[s] if first else 1)
        assert spec.shortcut == (not first) and published.blocks[b + 1].shortcut == (not first)
        conv = published.blocks[b + 1].conv
        assert (conv.depth_conv.se is not None) == stage_se[s]
        assert conv.depth_conv.act_name == conv.inverted_bottleneck.act_name == stage_act[s]
        assert conv.point_linear.act_name is None
        assert conv.inverted_bottleneck.weight.shape[0] == make_divisible(round(spec.in_channels * 6), 8)
    block0 = published.blocks[0]
    assert block0.shortcut and block0.conv.inverted_bottleneck is None
    assert block0.conv.depth_conv.ks_list == (3,) and block0.conv.depth_conv.weight.shape == (24, 1, 3, 3)
    assert published.first_conv.stride == 2 and published.first_conv.w_bits == published.first_conv.a_bits == 32
    assert published.feature_mix_layer.bn is None
    se = published.blocks[20].conv.depth_conv.se
    assert se.reduce.weight.shape == (288, 1152, 1, 1)  # make_divisible(1152 // 4, 8)


def test_212_quantizers_in_published_order(published):
    names = published.quantizers()
    assert len(names) == 212
    tsv = _tsv_keys(QFA_TSV)
    published_groups = []
    for key, _ in tsv:
        if ".quantizers." in key:
            group = key.split(".quantizers.")[0]
            if not published_groups or published_groups[-1] != group:
                published_groups.append(group)
    assert len(published_groups) == 212
    assert [published_quantizer_name(n) for n in names] == published_groups
    modules = dict(published.named_modules())
    for name in names:  # each group: one quantizer per bit-width 2, 3, 4, 8
        assert sorted(modules[name].keys(), key=int) == ["2", "3", "4", "8"]


def test_depthwise_has_quantizers_per_kernel_size(published):
    dws = [m for m in published.modules() if isinstance(m, DynamicQDepthwiseConv2d)]
    assert len(dws) == 21
    for dw in dws[1:]:
        assert list(dw.w_quantizers.keys()) == ["3", "5", "7"] == list(dw.a_quantizers.keys())
        assert dw.kernel_transforms["7to5"].shape == (25, 25) and dw.kernel_transforms["5to3"].shape == (9, 9)
        assert torch.equal(dw.kernel_transforms["7to5"], torch.eye(25))


def test_blocks_per_depth(published):
    seen = []
    for block in published.blocks[1:]:
        block.register_forward_hook(lambda m, i, o: seen.append(m))
    published.eval()
    x = torch.randn(2, 3, 32, 32)
    for depths in ([2, 3, 4, 2, 3], [4, 4, 4, 4, 4], [2, 2, 2, 2, 2]):
        seen.clear()
        published.set_active_subnet(d=depths)
        with torch.no_grad():
            published(x)
        expected = [published.blocks[1 + s * 4 + i] for s, d in enumerate(depths) for i in range(d)]
        assert seen == expected


def test_published_space_size():
    space = SearchSpace()
    assert (space.n_blocks, space.n_stages, space.n_qlayers) == (20, 5, 65)
    assert space.resolutions == tuple(range(128, 225, 4)) and len(space.resolutions) == 25
    assert space.block_stage == tuple(i // 4 for i in range(20))
    n = space.num_subnets()
    per_block = 3 * 3 * 3**6  # ks x e x 6 bit-widths (w, a of expand, depthwise, project)
    assert n == (per_block**2 + per_block**3 + per_block**4) ** 5
    assert math.isclose(float(n), 2.2e76, rel_tol=0.01)


def test_subnet_forward_at_several_resolutions_train_and_eval():
    model = QFAMobileNetV3(n_classes=10, width_mult=0.25)
    rng = random.Random(0)
    for res in (32, 40, 48):
        cfg = model.sample_active_subnet(rng)
        for train in (True, False):
            model.train(train)
            x = torch.randn(3, 3, res, res)
            if not train:  # eval mode quantizes with recalibrated ranges
                with torch.no_grad(), recalibrate(model):
                    model(x)
            y = model(x)
            assert y.shape == (3, 10) and torch.isfinite(y).all(), (cfg, res, train)
