"""Recalibrate the BN and BatchQuant statistics of one subnet and save the supernet with them.

The statistics of the active layers are set from a fixed subset of augmented training images
(spec 3); the subnet's held-out accuracy is printed. The output is a qfa supernet checkpoint that
remembers the calibrated subnet: `qfa export --checkpoint OUT` exports that subnet (no --subnets).
Example: `qfa calibrate --checkpoint runs/qfa-train/supernet.pt --subnets max --bits 4 --out max4.pt`,
then `qfa export --checkpoint max4.pt --out-dir export/`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import atomic_write_text
from ..train import options
from ..train.evaluation import evaluate_configs
from ..train.report import format_table
from ..train.weights import save_trained_supernet
from .eval import COLUMNS, prepare, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, options.CalibrateOptions)


def run(args: argparse.Namespace) -> int:
    opts, loaded = resolve(options.CalibrateOptions, args)
    calib, val, configs = prepare(opts, loaded, single=True)
    if len(configs) != 1:
        names = [name for name, _ in configs]
        raise ValueError(f"qfa calibrate takes exactly one subnet (one --subnets and one --bits), got {names}")
    name, cfg = configs[0]
    rows = evaluate_configs(loaded.model, configs, calib, val, opts.calib_batches)
    print(format_table(rows, COLUMNS, title=f"calibrated {name} at {cfg.resolution} px"))
    out = Path(opts.out) if opts.out else Path(opts.checkpoint).parent / "calibrated.pt"
    run_settings = {"data": opts.data, "batch_size": opts.batch_size, "calib_batches": opts.calib_batches,
                    "seed": opts.seed, "channels_last": opts.channels_last}  # fmt: skip
    extra = {"subnet": cfg.to_dict(), "results": rows, "source": str(opts.checkpoint), "run": run_settings}
    save_trained_supernet(loaded.model, out, extra)
    if opts.json:
        report = {"checkpoint": opts.checkpoint, "data": opts.data, "out": str(out), "results": rows}
        atomic_write_text(opts.json, json.dumps(report, indent=1))
    print(f"saved the calibrated supernet to {out} (export it: qfa export --checkpoint {out} --out-dir DIR)")
    return 0
