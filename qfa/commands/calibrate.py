"""Recalibrate the BN and BatchQuant statistics of one subnet and save the supernet with them.

The statistics of the active layers are set from a fixed subset of augmented training images
(spec 3); the subnet's held-out accuracy is printed. The output is a qfa supernet checkpoint whose
`extra["subnet"]` is the calibrated config (e.g. for `qfa export`).
Example: `qfa calibrate --ckpt runs/qfa-train/supernet.pt --subnets max --bits 4`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..train import options
from ..train.ckpt import CheckpointError
from ..train.evaluation import evaluate_configs
from ..train.report import format_table
from ..train.weights import save_trained_supernet
from .eval import COLUMNS, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, options.CalibrateOptions)


def run(args: argparse.Namespace) -> int:
    try:
        opts = options.resolve(options.CalibrateOptions, args)
        model, calib, val, configs = prepare(opts, single=True)
        if len(configs) != 1:
            names = [name for name, _ in configs]
            raise ValueError(f"qfa calibrate takes exactly one subnet (one --subnets and one --bits), got {names}")
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"qfa calibrate: error: {err}", file=sys.stderr)
        return 1
    rows = evaluate_configs(model, configs, calib, val, opts.calib_batches)
    print(format_table(rows, COLUMNS, title=f"calibrated {configs[0][0]} at {configs[0][1].resolution} px"))
    out = Path(opts.out) if opts.out else Path(opts.ckpt).parent / "calibrated.pt"
    extra = {"subnet": configs[0][1].to_dict(), "results": rows, "source": str(opts.ckpt)}
    save_trained_supernet(model, out, extra)
    print(f"saved the calibrated supernet to {out}")
    return 0
