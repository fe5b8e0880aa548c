"""NSGA-II over (predicted accuracy up, LUT-FLOPs down) with pymoo (spec 6).

The genome is the choice-index vector of a :class:`SubnetEncoder` (``ks``, ``e`` per block, ``d`` per
stage, resolution, ``w``/``a`` bits per quantized layer but the classifier). Variation follows the
published search: uniform crossover that swaps each gene with a small probability (0.007) and a
mutation that resets each gene to a different option with probability 0.02. The cost objective is
one metric of :class:`qfa.cost.CostModel` (default ``lut_flops``; see :data:`SEARCH_METRICS`). Hard
limits on that metric and on BitOPs are pymoo inequality constraints (constraint-domination), and
``--bits`` narrows the genome's bit options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.operators.sampling.rnd import IntegerRandomSampling
from pymoo.optimize import minimize
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from qfa.search.checks import check_at_least, check_probabilities
from qfa.search.encoding import SubnetEncoder

# Cost metrics the search can minimise (keys of CostModel.evaluate_batch).
SEARCH_METRICS = ("lut_flops", "published_lut_flops", "bitops", "macs")
# genes (n, n_genes) of the search encoder -> {"lut_flops": (n,), "bitops": (n,), ...} (raw counts)
CostFn = Callable[[np.ndarray], dict[str, np.ndarray]]
# genes (n, n_genes) of the search encoder -> predicted accuracy (n,)
AccuracyFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class NSGASettings:
    """Published defaults: population 500, 1000 generations, per-gene crossover 0.007, mutation 0.02."""

    population: int = 500
    generations: int = 1000
    crossover_per_gene: float = 0.007
    mutation_per_gene: float = 0.02
    seed: int = 0
    metric: str = "lut_flops"  # the cost objective (one of SEARCH_METRICS)

    def __post_init__(self) -> None:
        _check_metric(self.metric)
        check_at_least(self, population=2, generations=1)
        check_probabilities(self, "crossover_per_gene", "mutation_per_gene")


def _check_metric(metric: str) -> None:
    if metric not in SEARCH_METRICS:
        raise ValueError(f"unknown cost metric {metric!r} (use one of {', '.join(SEARCH_METRICS)})")


@dataclass(frozen=True)
class Constraints:
    """Hard limits (``None``: no limit). ``max_mflops`` is in millions of ``metric`` (default LUT-FLOPs),
    ``max_bitops`` a raw count."""

    max_mflops: float | None = None
    max_bitops: float | None = None
    metric: str = "lut_flops"

    def __post_init__(self) -> None:
        _check_metric(self.metric)
        for name in ("max_mflops", "max_bitops"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")

    @property
    def active(self) -> list[str]:
        return [n for n in ("max_mflops", "max_bitops") if getattr(self, n) is not None]

    def violations(self, costs: dict[str, np.ndarray]) -> np.ndarray:
        """``(n, k)`` pymoo inequality values (feasible where every column is <= 0)."""
        cols = []
        if self.max_mflops is not None:
            cols.append(costs[self.metric] / 1e6 - self.max_mflops)
        if self.max_bitops is not None:
            cols.append(costs["bitops"] - self.max_bitops)
        return np.stack(cols, axis=1) if cols else np.zeros((len(costs[self.metric]), 0))

    def feasible(self, costs: dict[str, np.ndarray]) -> np.ndarray:
        return np.all(self.violations(costs) <= 0, axis=1)


class GeneSwapCrossover(Crossover):
    """Uniform crossover of two parents: each gene is swapped with probability ``prob_gene``."""

    def __init__(self, prob_gene: float) -> None:
        super().__init__(n_parents=2, n_offsprings=2, prob=1.0)
        self.prob_gene = prob_gene

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        swap = random_state.random(X.shape[1:]) < self.prob_gene  # (n_matings, n_var)
        out = X.copy()
        out[0][swap], out[1][swap] = X[1][swap], X[0][swap]
        return out


class GeneResetMutation(Mutation):
    """Each gene, with probability ``prob_gene``, takes a different option chosen uniformly."""

    def __init__(self, prob_gene: float) -> None:
        super().__init__(prob=1.0)
        self.prob_gene = prob_gene

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        X = np.asarray(X, dtype=np.int64).copy()
        n_options = (problem.xu - problem.xl + 1).astype(np.int64)  # per gene
        hit = (random_state.random(X.shape) < self.prob_gene) & (n_options[None, :] > 1)
        # A uniform draw among the other options: shift by 1..n-1 (mod n).
        shift = 1 + np.floor(random_state.random(X.shape) * (n_options[None, :] - 1)).astype(np.int64)
        moved = (X - problem.xl + shift) % n_options[None, :] + problem.xl
        X[hit] = moved[hit]
        return X


class SubnetProblem(Problem):
    """Objectives ``(-predicted accuracy, millions of metric)``, both minimised; constraints from
    :class:`Constraints`."""

    def __init__(
        self,
        encoder: SubnetEncoder,
        accuracy: AccuracyFn,
        cost: CostFn,
        constraints: Constraints,
        metric: str = "lut_flops",
    ) -> None:
        self.encoder, self.accuracy, self.cost, self.constraints = encoder, accuracy, cost, constraints
        self.metric = metric
        super().__init__(
            n_var=encoder.n_genes,
            n_obj=2,
            n_ieq_constr=len(constraints.active),
            xl=np.zeros(encoder.n_genes, dtype=np.int64),
            xu=encoder.gene_upper.copy(),
            vtype=int,
        )

    def _evaluate(self, X, out, *args, **kwargs):
        genes = np.asarray(X, dtype=np.int64)
        costs = self.cost(genes)
        out["F"] = np.column_stack([-self.accuracy(genes), costs[self.metric] / 1e6])
        if self.constraints.active:
            out["G"] = self.constraints.violations(costs)


class _Progress(Callback):
    def __init__(self, bar) -> None:
        super().__init__()
        self.bar = bar

    def notify(self, algorithm: Any) -> None:
        self.bar.update(1)


@dataclass
class SearchResult:
    """The non-dominated feasible subnets found, sorted by the cost objective ``metric`` (ascending)."""

    genes: np.ndarray  # (k, n_genes) choice indices of the search encoder
    configs: list[Any]
    predicted: np.ndarray  # (k,)
    costs: dict[str, np.ndarray]  # every metric of the cost function, (k,) each
    metric: str = "lut_flops"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def objective(self) -> np.ndarray:
        """The cost objective of each subnet (raw count of ``metric``)."""
        return self.costs[self.metric]

    @property
    def lut_flops(self) -> np.ndarray:
        return self.costs["lut_flops"]

    @property
    def bitops(self) -> np.ndarray:
        return self.costs["bitops"]


def non_dominated(objectives: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of an ``(n, m)`` array of objectives to minimise."""
    if len(objectives) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(NonDominatedSorting().do(objectives, only_non_dominated_front=True))


def run_nsga2(
    encoder: SubnetEncoder,
    accuracy: AccuracyFn,
    cost: CostFn,
    constraints: Constraints | None = None,
    settings: NSGASettings | None = None,
    progress: bool = False,
) -> SearchResult:
    """Search and return the feasible non-dominated set of the final population (deterministic per seed)."""
    constraints = constraints or Constraints()
    settings = settings or NSGASettings()
    metric = settings.metric
    problem = SubnetProblem(encoder, accuracy, cost, constraints, metric)
    algorithm = NSGA2(
        pop_size=settings.population,
        sampling=IntegerRandomSampling(),
        crossover=GeneSwapCrossover(settings.crossover_per_gene),
        mutation=GeneResetMutation(settings.mutation_per_gene),
        eliminate_duplicates=True,
    )
    extra: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.generations, desc="NSGA-II", unit="gen")
        extra["callback"] = _Progress(bar)
    try:
        res = minimize(problem, algorithm, ("n_gen", settings.generations), seed=settings.seed, verbose=False, **extra)
    finally:
        if bar is not None:
            bar.close()
    pop = res.pop
    genes = np.asarray(pop.get("X"), dtype=np.int64)
    # One row per distinct function (inactive blocks do not matter), sorted: independent of population order.
    genes = np.unique(encoder.canonical(genes), axis=0)
    costs = cost(genes)
    keep = constraints.feasible(costs)
    if not np.any(keep):
        best = float(np.min(costs[metric])) / 1e6
        raise RuntimeError(
            f"no subnet in the final population satisfies the constraints {constraints} "
            f"(smallest {metric} found: {best:.3f} M); relax them or search longer"
        )
    genes = genes[keep]
    costs = {k: v[keep] for k, v in costs.items()}
    predicted = np.asarray(accuracy(genes), dtype=np.float64)
    front = non_dominated(np.column_stack([-predicted, costs[metric]]))
    order = front[np.lexsort((-predicted[front], costs[metric][front]))]
    genes = genes[order]
    return SearchResult(
        genes=genes,
        configs=[encoder.from_indices(g) for g in genes],
        predicted=predicted[order],
        costs={k: v[order] for k, v in costs.items()},
        metric=metric,
        info={"evaluations": int(res.algorithm.evaluator.n_eval), "generations": settings.generations},
    )
