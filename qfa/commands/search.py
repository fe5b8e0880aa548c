"""NSGA-II search over (predicted accuracy up, cost down), then exact re-evaluation of the front.

Published defaults: population 500, 1000 generations, per-gene crossover 0.007, mutation 0.02.
Cost: --metric (lut_flops: BitOPs / 64; published_lut_flops: the published search's table and rule,
or --flops-lut's table; bitops; macs; docs/metrics.md). Hard limits: --max-mflops (millions of the
metric), --max-bitops (raw BitOPs), --bits (allowed bit-widths). The predicted front is re-measured
for real (recalibrate + evaluate on the held-out split), cheapest first, stopping a candidate early
once it is clearly dominated by one already measured. Writes the front as JSON and a Pareto plot (PNG).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from qfa.config import SubnetConfig
from qfa.cost import METRIC_LABELS, CostModel
from qfa.io import atomic_write_text
from qfa.search import runtime
from qfa.search.encoding import SubnetEncoder
from qfa.search.nsga import SEARCH_METRICS, Constraints, NSGASettings, run_nsga2
from qfa.search.objectives import predicted_accuracy, subnet_costs
from qfa.search.plots import plot_pareto
from qfa.search.predictor import load_predictor
from qfa.search.records import read_records
from qfa.search.reevaluate import EarlyStop, measured_front, reevaluate_front


def add_arguments(p: argparse.ArgumentParser) -> None:
    runtime.add_supernet_arguments(p)
    p.add_argument("--predictor", required=True, help="accuracy predictor (`qfa predictor --out`)")
    p.add_argument("--out", required=True, help="search result (JSON)")
    p.add_argument("--plot", default=None, help="Pareto plot (PNG); None: <out>.png")
    p.add_argument("--samples", default=None, help="collected samples (JSONL) to draw in the plot")
    p.add_argument("--population", type=int, default=500, help="NSGA-II population size")
    p.add_argument("--generations", type=int, default=1000, help="NSGA-II generations")
    p.add_argument("--crossover", type=float, default=0.007, help="per-gene crossover (swap) probability")
    p.add_argument("--mutation", type=float, default=0.02, help="per-gene mutation probability")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument(
        "--metric",
        default=None,
        help=f"cost objective, one of {', '.join(SEARCH_METRICS)}; None: published_lut_flops with --flops-lut, "
        "else lut_flops",
    )
    runtime.add_flops_lut_arguments(p)
    p.add_argument("--max-mflops", type=float, default=None, help="upper limit on the --metric, in millions")
    p.add_argument("--max-bitops", type=float, default=None, help="upper limit on BitOPs (raw count, e.g. 1.5e9)")
    p.add_argument("--bits", type=int, nargs="+", default=None, help="allowed bit-widths; None: all of the supernet's")
    p.add_argument("--no-reevaluate", action="store_true", help="skip the exact re-evaluation of the front")
    p.add_argument(
        "--max-reevaluate", type=int, default=None, help="re-evaluate at most this many front members, evenly spread"
    )
    p.add_argument("--early-stop-z", type=float, default=3.0, help="Wilson-bound width for early stopping; 0: off")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_feasible(encoder: SubnetEncoder, cost, constraints: Constraints) -> None:
    """Fail fast when even the cheapest subnet (every gene at its smallest option) breaks a limit."""
    cheapest = cost(np.zeros((1, encoder.n_genes), dtype=np.int64))
    if not constraints.feasible(cheapest)[0]:
        raise ValueError(
            f"no subnet can meet the constraints: the cheapest one has {cheapest[constraints.metric][0] / 1e6:.4g} "
            f"M {constraints.metric} and {cheapest['bitops'][0]:.4g} BitOPs (limits: --max-mflops "
            f"{constraints.max_mflops}, --max-bitops {constraints.max_bitops})"
        )


def _metric(args: argparse.Namespace, cost: CostModel) -> str:
    metric = args.metric or ("published_lut_flops" if args.flops_lut else "lut_flops")
    if metric not in SEARCH_METRICS:
        raise ValueError(f"--metric: unknown metric {metric!r} (use one of {', '.join(SEARCH_METRICS)})")
    if metric not in cost.metrics:
        raise ValueError(f"--metric {metric}: {cost.published_error}")
    return metric


def _entries(result) -> list[dict[str, Any]]:
    return [
        {
            "config": cfg.to_dict(),
            "predicted": float(result.predicted[i]),
            **{k: float(v[i]) for k, v in result.costs.items()},
        }
        for i, cfg in enumerate(result.configs)
    ]


def run(args: argparse.Namespace) -> int:
    if args.max_reevaluate is not None and args.max_reevaluate < 1:
        raise ValueError(f"--max-reevaluate must be >= 1, got {args.max_reevaluate} (use --no-reevaluate to skip)")
    # Checked before the search: a plot must not replace the result, a typo must not cost the run.
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    if out.resolve() == plot.resolve():
        raise ValueError(f"--out {out} and --plot {plot} must be different files")
    if args.samples and not Path(args.samples).is_file():
        raise FileNotFoundError(f"--samples: file not found: {args.samples}")
    device = runtime.resolve_device(args.device)
    model = runtime.load_model(args, device)
    predictor = load_predictor(args.predictor, map_location=device)
    predictor.encoder.check_space(model.space, what="supernet")  # a predictor of another supernet
    encoder = SubnetEncoder(model.space, bits_options=args.bits)
    cost_model = runtime.make_cost_model(args, model)
    metric = _metric(args, cost_model)
    constraints = Constraints(max_mflops=args.max_mflops, max_bitops=args.max_bitops, metric=metric)
    settings = NSGASettings(
        population=args.population,
        generations=args.generations,
        crossover_per_gene=args.crossover,
        mutation_per_gene=args.mutation,
        seed=args.seed,
        metric=metric,
    )
    cost = subnet_costs(cost_model, encoder)
    _check_feasible(encoder, cost, constraints)
    result = run_nsga2(
        encoder, predicted_accuracy(predictor, encoder), cost, constraints, settings, not args.no_progress
    )
    entries = _entries(result)
    front = list(range(len(entries)))
    if not args.no_reevaluate:
        todo = front
        if args.max_reevaluate is not None and args.max_reevaluate < len(front):
            # Evenly spread along the front (it is sorted by the metric), ends included.
            picks = np.linspace(0, len(front) - 1, max(args.max_reevaluate, 1)).round().astype(int)
            todo = [front[i] for i in np.unique(picks)]
        calib, val = runtime.make_loaders(args, model, device)
        measured = reevaluate_front(
            model,
            [result.configs[i] for i in todo],
            [entries[i][metric] for i in todo],
            calib,
            val,
            num_calib_batches=args.calib_batches,
            early_stop=EarlyStop(z=args.early_stop_z or None),
            progress=not args.no_progress,
        )
        for i, m in zip(todo, measured, strict=True):
            entries[i].update(m)
        front = measured_front(entries, metric)
    output = {
        "checkpoint": str(args.checkpoint),
        "predictor": str(args.predictor),
        "target": predictor.extra.get("target", "top1"),
        "metric": metric,
        "flops_lut": cost_model.published.source if cost_model.published else None,
        "settings": vars(settings),
        "constraints": {
            "max_mflops": args.max_mflops,
            "metric": metric,
            "max_bitops": args.max_bitops,
            "bits": list(encoder.bits_options),
        },
        "reevaluated": not args.no_reevaluate,
        "front": [entries[i] for i in front],
        "candidates": entries,
        "info": result.info,
    }
    atomic_write_text(out, json.dumps(output, indent=2) + "\n")
    samples = None
    if args.samples:
        recs = read_records(args.samples)
        sample_costs = cost_model.evaluate_batch([SubnetConfig.from_dict(r["config"]) for r in recs])[metric]
        samples = (sample_costs / 1e6, [r["top1"] for r in recs])
    measured_pts = None
    if not args.no_reevaluate:
        done = [e for e in entries if e.get("status") == "measured"]
        measured_pts = ([e[metric] / 1e6 for e in done], [e["measured_top1"] for e in done])
    plot_pareto(
        plot,
        [e[metric] / 1e6 for e in entries],
        [e["predicted"] for e in entries],
        measured=measured_pts,
        samples=samples,
        max_mflops=args.max_mflops,
        xlabel=f"{METRIC_LABELS[metric]}, millions",
    )
    best = output["front"][-1] if output["front"] else None
    summary = f"search: {len(entries)} predicted-front subnets, {len(output['front'])} on the final front"
    if best is not None:
        acc = best.get("measured_top1", best["predicted"])
        summary += f"; most accurate {acc:.2f} at {best[metric] / 1e6:.3f} M {metric}"
    print(f"{summary}\nsaved {out}, plot {plot}")
    return 0
