"""NSGA-II search: variation operators, constraints, non-domination, determinism, bit restrictions."""

from __future__ import annotations

import numpy as np
import pytest

from qfa import SearchSpace
from qfa.cost import CostModel
from qfa.search.encoding import SubnetEncoder
from qfa.search.nsga import (
    Constraints,
    GeneResetMutation,
    GeneSwapCrossover,
    NSGASettings,
    SubnetProblem,
    non_dominated,
    run_nsga2,
)
from qfa.search.objectives import subnet_costs

SPACE = SearchSpace(depth_list=(1, 2), resolutions=(8, 12, 16))
SMALL = NSGASettings(population=24, generations=12, crossover_per_gene=0.1, mutation_per_gene=0.05, seed=0)


def _objectives(encoder: SubnetEncoder):
    """A synthetic accuracy (fixed random linear function of the features) and the real cost model."""
    w = np.random.default_rng(0).normal(size=encoder.n_features)

    def accuracy(genes: np.ndarray) -> np.ndarray:
        return encoder.features(genes).astype(np.float64) @ w

    return accuracy, subnet_costs(CostModel(SPACE, n_classes=10), encoder)


def _problem(encoder):
    acc, cost = _objectives(encoder)
    return SubnetProblem(encoder, acc, cost, Constraints())


def test_mutation_moves_genes_to_other_valid_options():
    enc = SubnetEncoder(SPACE)
    problem = _problem(enc)
    rng = np.random.default_rng(0)
    x = rng.integers(0, enc.gene_upper + 1, size=(400, enc.n_genes))
    y = GeneResetMutation(0.2)._do(problem, x, random_state=rng)
    changed = y != x
    assert abs(changed.mean() - 0.2) < 0.01  # every gene here has >= 2 options
    assert np.all(y >= 0) and np.all(y <= enc.gene_upper)
    assert np.array_equal(GeneResetMutation(0.0)._do(problem, x, random_state=rng), x)


def test_crossover_swaps_genes_between_the_two_parents():
    enc = SubnetEncoder(SPACE)
    problem = _problem(enc)
    rng = np.random.default_rng(1)
    parents = rng.integers(0, enc.gene_upper + 1, size=(2, 300, enc.n_genes))
    kids = GeneSwapCrossover(0.3)._do(problem, parents, random_state=rng)
    swapped = kids[0] == parents[1]
    differ = parents[0] != parents[1]
    assert abs(swapped[differ].mean() - 0.3) < 0.02
    # Each position keeps the parents' pair of values.
    assert np.array_equal(np.sort(kids, axis=0), np.sort(parents, axis=0))


def _assert_non_dominated(acc: np.ndarray, flops: np.ndarray) -> None:
    for i in range(len(acc)):
        dominates_i = (acc >= acc[i]) & (flops <= flops[i]) & ((acc > acc[i]) | (flops < flops[i]))
        assert not dominates_i.any(), f"entry {i} is dominated"


def test_search_front_is_feasible_non_dominated_and_deterministic():
    enc = SubnetEncoder(SPACE)
    acc, cost = _objectives(enc)
    everything = cost(np.random.default_rng(0).integers(0, enc.gene_upper + 1, size=(500, enc.n_genes)))
    limit = float(np.median(everything["lut_flops"])) / 1e6
    constraints = Constraints(max_mflops=limit)
    a = run_nsga2(enc, acc, cost, constraints, SMALL)
    assert len(a.configs) >= 2
    assert np.all(a.lut_flops <= limit * 1e6)
    np.testing.assert_allclose(a.predicted, acc(a.genes))
    np.testing.assert_allclose(a.lut_flops, cost(a.genes)["lut_flops"])
    _assert_non_dominated(a.predicted, a.lut_flops)
    assert np.all(np.diff(a.lut_flops) >= 0)  # sorted cheapest first
    b = run_nsga2(enc, acc, cost, constraints, SMALL)
    assert np.array_equal(a.genes, b.genes) and a.configs == b.configs
    c = run_nsga2(enc, acc, cost, constraints, NSGASettings(**{**vars(SMALL), "seed": 1}))
    assert a.configs != c.configs


def test_search_improves_on_random_sampling():
    enc = SubnetEncoder(SPACE)
    acc, cost = _objectives(enc)
    res = run_nsga2(enc, acc, cost, Constraints(), NSGASettings(population=30, generations=25, seed=0))
    rand = np.random.default_rng(5).integers(0, enc.gene_upper + 1, size=(30 * 26, enc.n_genes))
    # At the front's cost levels no random subnet (same evaluation budget) is much better.
    best_random = acc(rand).max()
    assert res.predicted.max() >= best_random


def test_bit_restriction_and_bitops_limit():
    enc = SubnetEncoder(SPACE, bits_options=(3, 4))
    acc, cost = _objectives(enc)
    sample = cost(np.random.default_rng(0).integers(0, enc.gene_upper + 1, size=(200, enc.n_genes)))
    limit = float(np.quantile(sample["bitops"], 0.3))
    res = run_nsga2(enc, acc, cost, Constraints(max_bitops=limit), SMALL)
    for cfg in res.configs:
        assert set(cfg.w_bits[:-1]) | set(cfg.a_bits[:-1]) <= {3, 4}
        assert cfg.w_bits[-1] == cfg.a_bits[-1] == 8  # classifier: W8A8 rule
        SPACE.check_config(cfg)
    assert np.all(res.bitops <= limit)


def test_unsatisfiable_constraints_and_bad_settings():
    enc = SubnetEncoder(SPACE)
    acc, cost = _objectives(enc)
    with pytest.raises(RuntimeError, match="no subnet in the final population satisfies"):
        run_nsga2(enc, acc, cost, Constraints(max_mflops=1e-6), NSGASettings(population=8, generations=2))
    with pytest.raises(ValueError, match="max_mflops must be > 0"):
        Constraints(max_mflops=-1.0)
    with pytest.raises(ValueError, match="population"):
        NSGASettings(population=1)


def test_non_dominated_helper():
    pts = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.5, 0.5], [2.0, 2.0]])
    assert non_dominated(pts).tolist() == [0, 1, 3]
