"""Recalibrate and evaluate subnets of a trained supernet on held-out data.

Each subnet's BN and BatchQuant statistics are recalibrated on a fixed subset of augmented training
images (spec 3), then it is evaluated; prints a table and optionally writes JSON.
Example: `qfa eval --ckpt runs/qfa-train/supernet.pt --subnets min,max --bits 2,4`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import data as qdata
from ..config import SubnetConfig
from ..data import DeviceLoader
from ..io import atomic_write_text
from ..networks.mobilenetv3 import QFAMobileNetV3
from ..train import options
from ..train.ckpt import CheckpointError
from ..train.evaluation import device_of, evaluate_configs, load_any_supernet, named_configs, with_resolution
from ..train.report import format_table

COLUMNS = ("subnet", "bits", "res", "top1", "top5", "loss", "n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, options.EvalOptions)


def prepare(
    opts: options.EvalOptions, single: bool = False
) -> tuple[QFAMobileNetV3, DeviceLoader, DeviceLoader, list[tuple[str, SubnetConfig]]]:
    """``(model, calib loader, val loader, configs)`` for ``opts`` (shared with ``qfa calibrate``;
    ``single``: one subnet, at the lowest bit-width unless ``--bits`` says otherwise)."""
    device = device_of(opts.device)
    n_classes = qdata.num_classes(opts.data)
    model, _ = load_any_supernet(opts.ckpt, n_classes, opts.backend)
    if model.n_classes != n_classes:
        raise ValueError(f"--ckpt has {model.n_classes} classes but --data {opts.data!r} has {n_classes}")
    model.to(device)
    resolutions = model.space.resolutions
    bits = opts.bits if opts.bits or not single else (min(model.space.bits_list),)
    configs = [
        (name, with_resolution(name, cfg, opts.resolution, resolutions))
        for name, cfg in named_configs(model, opts.subnets, bits)
    ]
    crop = max(cfg.resolution for _, cfg in configs)
    _, val = qdata.build_loaders(opts.data, opts.batch_size, crop, opts.workers, None, opts.seed, device=device)
    calib = qdata.calib_loader(
        opts.data, opts.batch_size, crop, opts.calib_batches, opts.workers, None, opts.seed, device=device
    )
    return model, calib, val, configs


def run(args: argparse.Namespace) -> int:
    try:
        opts = options.resolve(options.EvalOptions, args)
        model, calib, val, configs = prepare(opts)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"qfa eval: error: {err}", file=sys.stderr)
        return 1
    rows = evaluate_configs(model, configs, calib, val, opts.calib_batches)
    print(format_table(rows, COLUMNS, title=f"{opts.ckpt}: recalibrated subnets on {opts.data!r} (held-out)"))
    if opts.json:  # atomic: a kill mid-write leaves the previous file, never a torn one
        atomic_write_text(opts.json, json.dumps({"ckpt": opts.ckpt, "data": opts.data, "results": rows}, indent=1))
    return 0
