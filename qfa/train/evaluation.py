"""Recalibrate-and-evaluate for ``qfa eval`` / ``qfa calibrate``: turn a subnet description into
configs, evaluate them (the supernet comes from :func:`qfa.checkpoint.load_any`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import SubnetConfig
from ..evaluate import evaluate_subnet
from ..io import read_text
from ..published import subnets_file
from ..space import SearchSpace
from .distributed import pick_device


def named_configs(
    model: nn.Module | SearchSpace, spec: str, bits: tuple[int, ...] | None
) -> list[tuple[str, SubnetConfig]]:
    """``(name, config)`` pairs from ``spec``: comma-separated ``min``/``max``/``fp`` (each at every
    bit-width of ``bits``, default all options of the supernet), a ``.json``/``.jsonl`` file of
    SubnetConfig dicts (a list, one per line, or ``{"config": {...}}`` records), or ``published-pareto``
    (the shipped published Pareto front). ``model``: the supernet, or its :class:`qfa.SearchSpace`."""
    space = getattr(model, "space", model)
    spec = subnets_file(spec)
    if spec.endswith((".json", ".jsonl")):
        return [(f"#{i}", cfg) for i, cfg in enumerate(_configs_from_file(spec, space))]
    bad = sorted(set(bits or ()) - set(space.bits_list))
    if bad:
        raise ValueError(f"--bits {bad[0]} is not one of the supernet's bit-widths {list(space.bits_list)}")
    out = []
    for kind in (k.strip() for k in spec.split(",") if k.strip()):
        if kind == "fp":
            out.append(("fp", space.full_precision()))
            continue
        if kind not in ("min", "max"):
            raise ValueError(
                f"--subnets: unknown subnet {kind!r} (use min, max, fp, published-pareto or a .json/.jsonl file)"
            )
        pick = min if kind == "min" else max
        for b in bits or space.bits_list:
            cfg = space.make_config(
                ks=pick(space.ks_list), e=pick(space.expand_list), d=pick(space.depth_list), w_bits=b, a_bits=b
            )
            out.append((f"{kind} w{b}a{b}" if b != 32 else f"{kind} fp", cfg))
    if not out:
        raise ValueError(f"--subnets {spec!r} names no subnet")
    return out


def _configs_from_file(path: str, space) -> list[SubnetConfig]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--subnets {path!r}: no such file")
    text = read_text(path, "--subnets")
    try:
        if path.endswith(".jsonl"):
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            loaded = json.loads(text)
            items = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError as err:
        raise ValueError(f"--subnets {path!r}: not valid JSON ({err})") from None
    configs = []
    for i, item in enumerate(items):
        item = item.get("config", item) if isinstance(item, dict) else item
        try:
            configs.append(SubnetConfig.from_dict(item).validate(space))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--subnets {path!r}, entry {i}: {err}") from None
    return configs


def with_resolution(name: str, cfg: SubnetConfig, resolution: int | None, resolutions: tuple[int, ...]) -> SubnetConfig:
    """``cfg`` with its resolution: ``resolution`` if given, else its own, else the smallest for min
    subnets and the largest otherwise."""
    if resolution is not None and resolution not in resolutions:
        raise ValueError(f"--resolution {resolution} is not one of the supernet's resolutions {list(resolutions)}")
    if resolution is None and cfg.resolution is not None and cfg.resolution not in resolutions:
        raise ValueError(
            f"subnet {name}: its resolution {cfg.resolution} is not one of the supernet's resolutions "
            f"{list(resolutions)} (pass --resolution to evaluate it at another one)"
        )
    res = resolution if resolution is not None else cfg.resolution
    if res is None:
        res = min(resolutions) if name.startswith("min") else max(resolutions)
    return dataclasses.replace(cfg, resolution=res)


def evaluate_configs(
    model: nn.Module,
    configs: list[tuple[str, SubnetConfig]],
    calib_loader: Iterable,
    val_loader: Iterable,
    calib_batches: int,
) -> list[dict[str, Any]]:
    """Recalibrate and evaluate each config; one row per subnet."""
    rows = []
    for name, cfg in configs:
        metrics = evaluate_subnet(model, cfg, calib_loader, val_loader, calib_batches)
        bits = sorted(set(cfg.w_bits[:-1]) | set(cfg.a_bits[:-1]))
        rows.append({"subnet": name, "bits": ",".join(map(str, bits)), "res": cfg.resolution, **metrics,
                     "config": cfg.to_dict()})  # fmt: skip
    return rows


def device_of(name: str) -> torch.device:
    return pick_device(name)
