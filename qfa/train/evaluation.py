"""Recalibrate-and-evaluate for ``qfa eval`` / ``qfa calibrate``: load a supernet in any layout, turn a
subnet description into configs, evaluate them."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SubnetConfig
from ..evaluate import evaluate_subnet
from ..networks import QFAMobileNetV3
from .distributed import pick_device
from .weights import OFA_FP, QFA_PUBLISHED, QFA_SUPERNET, QFA_TRAIN, load_into, read_checkpoint


def load_any_supernet(path: str | os.PathLike, n_classes: int, backend: str | None = None) -> tuple[nn.Module, str]:
    """The supernet stored at ``path``: built from the saved arguments (qfa formats) or the published
    architecture with ``n_classes`` outputs (published QFA / OFA state dicts). Returns ``(model, layout)``."""
    layout, payload = read_checkpoint(path)
    if layout == QFA_SUPERNET:
        kwargs = dict(payload["model_kwargs"])
    elif layout == QFA_TRAIN:
        kwargs = dict(payload["model_config"])
    else:
        kwargs = {"n_classes": n_classes, "bits_list": (2, 3, 4) if layout == QFA_PUBLISHED else (2, 3, 4, 32)}
    model = QFAMobileNetV3(**kwargs, backend=backend)
    load_into(model, path)
    return model, layout if layout != OFA_FP else OFA_FP


def named_configs(model: nn.Module, spec: str, bits: tuple[int, ...] | None) -> list[tuple[str, SubnetConfig]]:
    """``(name, config)`` pairs from ``spec``: comma-separated ``min``/``max``/``fp`` (each at every
    bit-width of ``bits``, default all options of the supernet), or a ``.json``/``.jsonl`` file of
    SubnetConfig dicts (a list, one per line, or ``{"config": {...}}`` records)."""
    space = model.space
    if spec.endswith((".json", ".jsonl")):
        return [(f"#{i}", cfg) for i, cfg in enumerate(_configs_from_file(spec, space))]
    out = []
    for kind in (k.strip() for k in spec.split(",") if k.strip()):
        if kind == "fp":
            out.append(("fp", space.full_precision()))
            continue
        if kind not in ("min", "max"):
            raise ValueError(f"--subnets: unknown subnet {kind!r} (use min, max, fp or a .json/.jsonl file)")
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
    text = Path(path).read_text()
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
