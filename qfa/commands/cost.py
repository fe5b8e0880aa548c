"""Costs of subnets, without data or a GPU: MACs, parameters, BitOPs, LUT-FLOPs (BitOPs / 64) and the
published LUT-FLOPs (the published search's table and rule; docs/metrics.md), one row per config.

Configs: a .json / .jsonl file of SubnetConfig dicts, min / max / fp, or `published-pareto` (the
published Pareto front, shipped). Space: the published QFA MobileNetV3 w1.2 (1000 classes), or the
supernet of --checkpoint. Example: `qfa cost --subnets published-pareto`. Convert the published
pickled table to JSON once: `qfa cost --flops-lut lut_flops_1.20.npy --allow-pickle --write-lut lut.json`.
"""

from __future__ import annotations

import argparse
import json
import sys

from qfa.checkpoint import load_any
from qfa.commands.flags import add_checkpoint_arg, add_subnets_arg
from qfa.cost import CostModel
from qfa.flops_lut import table_to_json
from qfa.io import atomic_write_text
from qfa.search.runtime import add_flops_lut_arguments, make_cost_model
from qfa.space import SearchSpace
from qfa.train.evaluation import named_configs, with_resolution
from qfa.train.report import format_table

COLUMNS = (  # (row key, header, scale)
    ("macs", "MACs (M)", 1e6),
    ("params", "params (M)", 1e6),
    ("bitops", "BitOPs (G)", 1e9),
    ("lut_flops", "LUT-FLOPs (M)", 1e6),
    ("published_lut_flops", "published LUT-FLOPs (M)", 1e6),
)
LUT_METRICS = {"published_lut_flops": "the published table", "lut_flops": "ours, BitOPs / 64"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_subnets_arg(
        p,
        help="configs: a .json/.jsonl file of SubnetConfig dicts (or {'config': ...} records), any of min, max, "
        "fp (comma-separated), or published-pareto (the published Pareto front, shipped)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="score every config at this resolution; None: its own, else the smallest for min and the largest else",
    )
    add_checkpoint_arg(
        p,
        required=False,
        help="supernet whose space and classes to score in (any checkpoint qfa train / calibrate wrote, or a "
        "published QFA / Once-for-All state dict); None: the published QFA MobileNetV3 w1.2, 1000 classes",
    )
    add_flops_lut_arguments(p)
    p.add_argument("--under", type=float, default=20.0, help="count the configs under this many MLUT-FLOPs")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file ('-': print JSON, no table)")
    p.add_argument(
        "--write-lut",
        default=None,
        help="write the table behind published_lut_flops (--flops-lut's, else the closed formula's) at the "
        "supernet's resolutions as JSON",
    )


def _cost_model(args: argparse.Namespace) -> CostModel:
    if args.checkpoint is None:
        return make_cost_model(args, SearchSpace(), n_classes=1000)
    return make_cost_model(args, load_any(args.checkpoint, n_classes=1000).model)


def run(args: argparse.Namespace) -> int:
    if args.subnets is None and args.write_lut is None:
        raise ValueError("--subnets is required (or --write-lut alone)")
    if not args.under > 0:
        raise ValueError(f"--under must be > 0, got {args.under}")
    cost = _cost_model(args)
    if args.write_lut is not None:
        if cost.published is None:
            raise ValueError(cost.published_error)
        atomic_write_text(args.write_lut, json.dumps(table_to_json(cost.published.table()), separators=(",", ":")))
        print(f"wrote the FLOPs table ({cost.published.source}) to {args.write_lut}", file=sys.stderr)
    if args.subnets is None:
        return 0
    space = cost.space
    configs = [
        (name, with_resolution(name, cfg, args.resolution, space.resolutions))
        for name, cfg in named_configs(space, args.subnets, None)
    ]
    costs = cost.evaluate_batch([cfg for _, cfg in configs])
    rows = [
        {
            "subnet": name,
            "res": cfg.resolution,
            **{k: float(costs[k][i]) for k in cost.metrics},
            "config": cfg.to_dict(),
        }
        for i, (name, cfg) in enumerate(configs)
    ]
    summary = f"under {args.under:g} MLUT-FLOPs: " + ", ".join(
        f"{int((costs[k] < args.under * 1e6).sum())} of {len(rows)} by {k} ({note})"
        for k, note in LUT_METRICS.items()
        if k in costs
    )
    if args.json is not None:
        text = json.dumps({"subnets": args.subnets, "flops_lut": cost.published.source if cost.published else None,
                           "rows": rows}, indent=1)  # fmt: skip
        if args.json == "-":
            print(text)
            return 0
        atomic_write_text(args.json, text + "\n")
    columns = [(k, header, scale) for k, header, scale in COLUMNS if k in cost.metrics]
    table = [
        {"subnet": r["subnet"], "res": r["res"], **{header: r[k] / scale for k, header, scale in columns}} for r in rows
    ]
    print(format_table(table, ["subnet", "res", *(header for _, header, _ in columns)]))
    print(summary)
    return 0
