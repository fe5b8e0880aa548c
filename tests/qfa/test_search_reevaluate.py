"""Exact re-evaluation of the front: early stopping only for clearly dominated candidates."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from qfa.search.reevaluate import EarlyStop, measured_front, reevaluate_front, wilson_upper

N_IMAGES, BATCH, CLASSES = 2000, 100, 10


class FakeSupernet(nn.Module):
    """Classifies an image correctly iff its hidden score (pixel [0, 0, 0]) is below the active accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # calibrate() looks up the device from the parameters
        self.rate = 0.0
        self.activations = 0

    def set_active_config(self, cfg) -> None:
        self.rate = cfg.accuracy
        self.activations += 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = images[:, 1, 0, 0].long()
        correct = images[:, 0, 0, 0] < self.rate
        guess = torch.where(correct, labels, (labels + 1) % CLASSES)
        return nn.functional.one_hot(guess, CLASSES).float()


def _loader(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(N_IMAGES, generator=g)
    labels = torch.randint(0, CLASSES, (N_IMAGES,), generator=g)
    images = torch.zeros(N_IMAGES, 3, 2, 2)
    images[:, 0, 0, 0] = scores
    images[:, 1, 0, 0] = labels.float()
    return [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, N_IMAGES, BATCH)]


def _candidates(accuracies):
    return [SimpleNamespace(accuracy=a, resolution=None) for a in accuracies]


def test_wilson_upper_bound():
    for correct, n in [(0, 10), (7, 10), (450, 500), (500, 500)]:
        up = wilson_upper(correct, n, 3.0)
        assert correct / n <= up <= 1.0
        assert wilson_upper(correct, n, 1.0) <= up
    # Large n: close to the normal approximation p + z * sqrt(p (1 - p) / n).
    p, n, z = 0.7, 100_000, 2.0
    assert wilson_upper(int(p * n), n, z) == pytest.approx(p + z * math.sqrt(p * (1 - p) / n), rel=1e-4)
    # Coverage: the bound at z = 3 is below the true rate far less often than 1 in 100.
    rng = np.random.default_rng(0)
    hits = rng.binomial(200, 0.6, size=2000)
    misses = np.mean([wilson_upper(int(h), 200, 3.0) < 0.6 for h in hits])
    assert misses <= norm.sf(3.0) * 10


def test_dominated_candidates_stop_early_and_close_ones_do_not():
    model, loader = FakeSupernet(), _loader()
    # LUT-FLOPs ascending: 0.9 (measured), 0.5 (dominated), 0.895 (within noise: measured), 0.95, 0.3 (dominated).
    accs, flops = [0.9, 0.5, 0.895, 0.95, 0.3], [1.0, 2.0, 3.0, 4.0, 5.0]
    out = reevaluate_front(model, _candidates(accs), flops, loader[:2], loader, num_calib_batches=1)
    status = [e["status"] for e in out]
    assert status == ["measured", "dominated", "measured", "measured", "dominated"]
    for e, a in zip(out, accs, strict=True):
        if e["status"] == "measured":
            assert e["images"] == N_IMAGES
            assert e["measured_top1"] == pytest.approx(100 * a, abs=3.0)
        else:
            assert EarlyStop().min_images <= e["images"] < N_IMAGES / 4
    entries = [dict(e, lut_flops=f) for e, f in zip(out, flops, strict=True)]
    assert measured_front(entries) == [0, 3]


def test_order_is_by_cost_and_early_stop_can_be_disabled():
    model, loader = FakeSupernet(), _loader(1)
    accs, flops = [0.3, 0.9], [5.0, 1.0]  # the cheap accurate one is measured first
    out = reevaluate_front(model, _candidates(accs), flops, loader[:1], loader, num_calib_batches=1)
    assert [e["status"] for e in out] == ["dominated", "measured"]
    out = reevaluate_front(
        model, _candidates(accs), flops, loader[:1], loader, num_calib_batches=1, early_stop=EarlyStop(z=None)
    )
    assert [e["status"] for e in out] == ["measured", "measured"]
    assert all(e["images"] == N_IMAGES for e in out)
    with pytest.raises(ValueError, match="2 configs but 1"):
        reevaluate_front(model, _candidates(accs), flops[:1], loader, loader)
