"""Train the accuracy predictor on collected samples (``qfa collect`` output).

Reports held-out RMSE (and that of a constant predictor), Kendall tau, writes a predicted-vs-measured
scatter plot and saves the predictor (state dict + encoding metadata, atomic write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from qfa.io import atomic_write_text, strict_json
from qfa.search.encoding import SubnetEncoder
from qfa.search.plots import plot_predictions
from qfa.search.predictor import TrainSettings, regression_metrics, save_predictor, split_indices, train_predictor
from qfa.search.records import check_consistent, read_records
from qfa.train.distributed import parse_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="JSONL file written by `qfa collect`")
    p.add_argument("--out", required=True, help="where to save the predictor (.pt)")
    p.add_argument("--plot", default=None, help="predicted-vs-measured scatter (PNG); None: <out>.png")
    p.add_argument("--report", default=None, help="metrics as JSON; None: <out>.json")
    p.add_argument("--target", default="top1", help="record field to predict")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction of the samples")
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=2048, help="samples per training batch")
    p.add_argument("--hidden", type=int, nargs="+", default=[600, 600, 600], help="hidden layer widths")
    p.add_argument(
        "--no-group-scaling",
        action="store_true",
        help="feed the plain one-hot features (the published input) instead of group-scaled ones",
    )
    p.add_argument("--seed", type=int, default=0, help="split, initialisation and shuffling seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run(args: argparse.Namespace) -> int:
    # Every flag is checked before training, so a typo does not cost the run (or overwrite an output).
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    report_path = Path(args.report) if args.report else out.with_suffix(".json")
    if len({out.resolve(), plot.resolve(), report_path.resolve()}) != 3:
        raise ValueError(f"--out {out}, --plot {plot} and --report {report_path} must be different files")
    if any(h < 1 for h in args.hidden):
        raise ValueError(f"--hidden widths must be >= 1, got {args.hidden}")
    device = parse_device(args.device)
    samples = Path(args.samples)
    if not samples.is_file():
        raise FileNotFoundError(f"--samples: file not found: {samples}")
    records = read_records(samples)
    space = check_consistent(records, samples)
    missing = [r.get("index") for r in records if not _is_number(r.get(args.target))]
    if missing:
        raise ValueError(
            f"--target {args.target!r}: missing or not a number in {len(missing)} record(s) of {samples} "
            f"(e.g. index {missing[0]})"
        )
    encoder = SubnetEncoder(space)
    features = encoder.encode([r["config"] for r in records])
    targets = np.array([float(r[args.target]) for r in records])
    train_idx, val_idx = split_indices(len(records), args.val_fraction, args.seed)
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    model, losses = train_predictor(
        encoder,
        features[train_idx],
        targets[train_idx],
        settings,
        hidden=args.hidden,
        device=device,
        group_scaling=not args.no_group_scaling,
    )
    baseline = float(targets[train_idx].mean())
    pred = model.predict_genes(encoder.to_index_matrix([records[i]["config"] for i in range(len(records))]))
    report = {
        "samples": str(samples),
        "target": args.target,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "held_out": regression_metrics(targets[val_idx], pred[val_idx], baseline),
        "train": regression_metrics(targets[train_idx], pred[train_idx], baseline),
        "final_train_loss": losses[-1],
        "settings": vars(settings)
        | {"hidden": list(args.hidden), "val_fraction": args.val_fraction, "group_scaling": not args.no_group_scaling},
    }
    save_predictor(out, model, extra=report)
    plot_predictions(
        plot,
        targets[val_idx],
        pred[val_idx],
        rmse=report["held_out"]["rmse"],
        kendall_tau=report["held_out"]["kendall_tau"],
        train=(targets[train_idx], pred[train_idx]),
    )
    atomic_write_text(report_path, strict_json(report, indent=2) + "\n")
    h = report["held_out"]
    if not h["rmse"] < h["baseline_rmse"]:
        print(
            f"qfa predictor: warning: the held-out RMSE {h['rmse']:.4f} is not better than a constant predictor's "
            f"{h['baseline_rmse']:.4f}: the predictor has learnt nothing useful (collect more samples, "
            "train longer, or check that the accuracies vary)",
            file=sys.stderr,
        )
    print(
        f"predictor: {len(train_idx)} train / {len(val_idx)} held-out samples; held-out RMSE {h['rmse']:.4f} "
        f"(constant predictor {h['baseline_rmse']:.4f}), Kendall tau {h['kendall_tau']:.3f}\n"
        f"saved {out}, plot {plot}, report {report_path}"
    )
    return 0
