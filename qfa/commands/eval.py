"""Recalibrate and evaluate subnets of a trained supernet on held-out data.

Each subnet's BN and BatchQuant statistics are recalibrated on a fixed subset of augmented training
images (spec 3), then it is evaluated; prints a table and optionally writes JSON. The data, batch
size, recalibration settings and memory format default to those of the run that wrote the
checkpoint, so `qfa eval` on `qfa train`'s output reproduces train's final table.
Example: `qfa eval --checkpoint runs/qfa-train/supernet.pt --subnets min,max --bits 2,4`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from .. import data as qdata
from ..checkpoint import LoadedSupernet, load_any
from ..config import SubnetConfig
from ..data import DeviceLoader
from ..io import atomic_write_text
from ..train import options
from ..train.evaluation import device_of, evaluate_configs, named_configs, with_resolution
from ..train.report import format_table
from ..train.trainer import VAL_BATCH

COLUMNS = ("subnet", "bits", "res", "top1", "top5", "loss", "n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, options.EvalOptions)


def resolve(cls: type, args: argparse.Namespace) -> tuple[Any, LoadedSupernet]:
    """``(options, checkpoint)``: the options with the checkpoint's run settings as defaults (below the
    command line and ``--config``, above the preset)."""
    opts = options.resolve(cls, args)
    loaded = load_any(opts.checkpoint, qdata.num_classes(opts.data), opts.backend)  # classes: for published layouts
    opts = options.resolve(cls, args, defaults=loaded.run)
    if loaded.model.n_classes != (n := qdata.num_classes(opts.data)):
        raise ValueError(f"--checkpoint has {loaded.model.n_classes} classes but --data {opts.data!r} has {n}")
    return opts, loaded


def prepare(
    opts: options.EvalOptions, loaded: LoadedSupernet, single: bool = False
) -> tuple[DeviceLoader, DeviceLoader, list[tuple[str, SubnetConfig]]]:
    """``(calib loader, val loader, configs)`` for ``opts`` (shared with ``qfa calibrate``; ``single``:
    one subnet, at the lowest bit-width unless ``--bits`` says otherwise). The model moves to the device."""
    device = device_of(opts.device)
    model = loaded.model
    model.to(device, memory_format=torch.channels_last if opts.channels_last else torch.preserve_format)
    resolutions = model.space.resolutions
    bits = opts.bits if opts.bits or not single else (min(model.space.bits_list),)
    configs = [
        (name, with_resolution(name, cfg, opts.resolution, resolutions))
        for name, cfg in named_configs(model, opts.subnets, bits)
    ]
    crop = max(resolutions)  # as in training: crops at the largest resolution, resized on the device
    common = {"device": device, "channels_last": opts.channels_last}
    # Held-out batches as in training's validation (the same sums, to the last bit)
    val_batch = max(opts.batch_size, VAL_BATCH)
    _, val = qdata.build_loaders(opts.data, opts.batch_size, crop, opts.workers, None, opts.seed,
                                 val_batch_size=val_batch, **common)  # fmt: skip
    calib = qdata.calib_loader(opts.data, opts.batch_size, crop, opts.calib_batches, opts.workers, None, opts.seed,
                               **common)  # fmt: skip
    return calib, val, configs


def run(args: argparse.Namespace) -> int:
    opts, loaded = resolve(options.EvalOptions, args)
    calib, val, configs = prepare(opts, loaded)
    rows = evaluate_configs(loaded.model, configs, calib, val, opts.calib_batches)
    print(format_table(rows, COLUMNS, title=f"{opts.checkpoint}: recalibrated subnets on {opts.data!r} (held-out)"))
    if opts.json:  # atomic: a kill mid-write leaves the previous file, never a torn one
        report = {"checkpoint": opts.checkpoint, "data": opts.data, "results": rows}
        atomic_write_text(opts.json, json.dumps(report, indent=1))
    return 0
