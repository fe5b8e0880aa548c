"""Command options as dataclasses: one definition gives the ``argparse`` flags (with the published
defaults and the digits-demo preset in ``--help``), the config-file keys and the resolved settings.

Precedence, highest first: command line > ``--config`` file (YAML or TOML, same keys as the flags,
``-`` or ``_``) > preset (``--preset digits``, automatic with ``--data digits``) > published default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..data import parse_resolutions

PRESETS = ("auto", "published", "digits")
_UNSET = object()


def option(
    default: Any,
    help: str,
    *,
    digits: Any = _UNSET,
    choices: tuple | None = None,
    group: str = "",
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that is also a command-line flag (``digits``: the value under the digits preset;
    ``aliases``: old flag spellings, accepted but not shown in ``--help``, and accepted as file keys).
    A ``None`` default shows as "auto" when the help explains an ``(auto: ...)`` choice, else "none"."""
    meta = {"help": help, "choices": choices, "group": group, "aliases": aliases}
    if digits is not _UNSET:
        meta["digits"] = digits
    return field(default=default, metadata=meta)


def parse_int_list(text: Any) -> tuple[int, ...]:
    """``"2,3,4"``, ``[2, 3, 4]`` or ``4`` -> ``(2, 3, 4)``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return (text,)
    if isinstance(text, str):
        items = [t for t in text.replace(" ", "").split(",") if t]
    elif isinstance(text, (list, tuple)):
        items = list(text)
    else:
        raise ValueError(f"expected a comma-separated list of ints, got {text!r}")
    try:
        return tuple(int(t) for t in items)
    except (TypeError, ValueError):
        raise ValueError(f"expected a comma-separated list of ints, got {text!r}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation such as ``int | None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def convert(name: str, value: Any, hint: Any) -> Any:
    """``value`` (from the command line or a config file) converted to the field's type."""
    base, optional = _base_type(hint)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "auto", ""))):
        return None
    try:
        if typing.get_origin(base) is tuple:
            return parse_int_list(value)
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is float and isinstance(value, str):
            return float(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_flag(name)}: cannot use {value!r} as {getattr(base, '__name__', base)}") from None


def _describe(value: Any, help: str = "") -> str:
    if value is None:
        return "auto" if "auto" in help else "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, with_config: bool = True) -> None:
    """Add one flag per field of the options dataclass ``cls`` (every default is ``SUPPRESS``, so
    the namespace holds only what was typed; :func:`resolve` fills in the rest)."""
    hints = _hints(cls)
    groups: dict[str, Any] = {}
    if with_config:
        g = parser.add_argument_group("configuration")
        g.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            metavar="FILE",
            help="options file: YAML (.yaml/.yml), TOML (.toml) or JSON with the flags' names as keys; flags "
            "override it",
        )
        g.add_argument(
            "--preset",
            default=argparse.SUPPRESS,
            choices=PRESETS,
            help="default values: 'published' (the paper's recipe), 'digits' (the CPU demo) or 'auto' "
            "(digits when --data digits, else published) (default: auto)",
        )
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group_name = meta.get("group") or "options"
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        group = groups[group_name]
        base, _ = _base_type(hints[f.name])
        text = meta["help"] + f" (default: {_describe(f.default, meta['help'])}"
        if "digits" in meta:
            text += f"; digits preset: {_describe(meta['digits'])}"
        text = (text + ")").replace("%", "%%")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "dest": f.name}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = lambda v, _n=f.name, _h=hints[f.name]: convert(_n, v, _h)
            kwargs["metavar"] = f.name.upper()
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
                kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
        group.add_argument(_flag(f.name), **kwargs)
        for alias in meta.get("aliases", ()):
            group.add_argument(_flag(alias), **(kwargs | {"help": argparse.SUPPRESS}))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML or TOML file, keys normalised to ``snake_case``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    if ext not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"--config {path!r}: use a .yaml, .yml, .toml or .json file")
    try:
        if ext == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode())
        elif ext in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw) or {}
        else:
            data = json.loads(raw)
    except Exception as err:  # TOMLDecodeError, yaml.YAMLError (not a ValueError), JSONDecodeError, UnicodeDecodeError
        msg = " ".join(str(err).split())
        raise ValueError(f"--config {path!r}: cannot parse the file ({type(err).__name__}: {msg})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"--config {path!r}: the file must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(
    cls: type, namespace: argparse.Namespace | Mapping[str, Any] | None = None, defaults: Mapping[str, Any] = ()
) -> Any:
    """An instance of ``cls`` from explicit values, a config file and the preset (see module doc).
    ``defaults``: values that rank between the config file and the preset (those a checkpoint stores
    about the run that made it)."""
    given = dict(vars(namespace) if isinstance(namespace, argparse.Namespace) else (namespace or {}))
    given = {k: v for k, v in given.items() if not k.startswith("_") and k != "command"}
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    file_values: dict[str, Any] = {}
    config_path = given.pop("config", None)
    if config_path:
        file_values = load_config_file(config_path)
    for f in dataclasses.fields(cls):  # old spellings
        for alias in f.metadata.get("aliases", ()):
            for source in (given, file_values):
                if alias in source:
                    source.setdefault(f.name, source.pop(alias))
    defaults = {k: v for k, v in dict(defaults).items() if k in names}
    preset = given.pop("preset", None) or file_values.pop("preset", None) or "auto"
    file_values.pop("config", None)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    unknown = sorted(set(file_values) - set(names))
    if unknown:
        raise ValueError(f"--config {config_path!r}: unknown keys {unknown}; valid keys: {sorted(names)}")
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"unknown options {unknown} for {cls.__name__}")
    if preset == "auto":
        fallback = defaults.get("data", names["data"].default if "data" in names else None)
        data = given.get("data", file_values.get("data", fallback))
        preset = "digits" if data == "digits" else "published"
    values: dict[str, Any] = {}
    for name, f in names.items():
        if name in given:
            values[name] = given[name]
        elif name in file_values:
            values[name] = convert(name, file_values[name], hints[name])
        elif name in defaults:
            values[name] = convert(name, defaults[name], hints[name])
        elif preset == "digits" and "digits" in f.metadata:
            values[name] = f.metadata["digits"]
        else:
            values[name] = f.default
    for name, f in names.items():
        choices = f.metadata.get("choices")
        if choices and values[name] not in choices:
            raise ValueError(f"{_flag(name)} must be one of {choices}, got {values[name]!r}")
    out = cls(**values)
    out.preset = preset  # which preset filled the gaps, for logs
    return out


@dataclass
class OptionsBase:
    """Common behaviour of the options dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------------------- qfa train

_DATA_HELP = (
    "'digits' (scikit-learn's bundled 8x8 digits, upscaled; no download), 'synthetic', "
    "or an ImageFolder root with train/ and val/"
)


@dataclass
class TrainOptions(OptionsBase):
    """Settings of ``qfa train`` (spec 5 gives the published values)."""

    # data
    data: str = option("digits", "data: " + _DATA_HELP, group="data")
    batch_size: int = option(64, "images per batch per process", group="data")
    resolutions: str = option(
        "128:224:4",
        "input resolutions, MIN:MAX:STEP or a list; crops are made at the largest, the min subnet trains "
        "at the smallest, the max subnet at the largest, the others at random ones",
        digits="24:32:4",
        group="data",
    )
    workers: int | None = option(
        None, "data loader processes per rank (auto: 0 for digits/synthetic, else 8)", group="data"
    )
    # supernet
    width_mult: float = option(1.2, "width multiplier of the supernet", digits=0.5, group="supernet")
    ks_list: tuple[int, ...] = option((3, 5, 7), "depthwise kernel sizes", digits=(3, 5), group="supernet")
    expand_list: tuple[int, ...] = option((3, 4, 6), "expand ratios", digits=(2, 3, 4), group="supernet")
    depth_list: tuple[int, ...] = option((2, 3, 4), "stage depths", digits=(1, 2), group="supernet")
    bits: tuple[int, ...] = option(
        (2, 3, 4, 32), "bit-width options: 2,3,4,32 for phase 0, 2,3,4 for phase 1 (32 = full precision)",
        group="supernet",
    )  # fmt: skip
    dropout: float = option(0.1, "dropout before the classifier", group="supernet")
    backend: str | None = option(None, "bquant kernel backend: reference, cpu, triton or cuda (auto: the fastest)",
                                 group="supernet")  # fmt: skip
    init: str | None = option(None, "initial weights: a Once-for-All FP or a QFA/qfa supernet checkpoint",
                              group="supernet")  # fmt: skip
    fp_epochs: int = option(
        0, "before the QFA epochs, train only the full-precision max network for N epochs, without "
        "distillation, with its own warmup and cosine (the first stage of Once-for-All's progressive "
        "shrinking): a from-scratch stand-in for --init with an OFA checkpoint",
        digits=5, group="supernet",
    )  # fmt: skip
    fp_lr: float | None = option(
        None, "learning rate per process of the --fp-epochs (auto: lr x subnets, the same step per unit of "
        "gradient as a step that sums `subnets` gradients)", digits=0.06, group="supernet",
    )  # fmt: skip
    # step and loss
    subnets: int = option(6, "subnets per step: min + max + random ones, gradients summed", digits=4, group="step")
    teacher: str | None = option(
        None,
        "full-precision teacher checkpoint for distillation (auto: in-place distillation from the supernet's "
        "own full-precision max subnet)",
        group="step",
    )
    kd_ratio: float = option(1.0, "weight of the distillation loss (0: label loss only)", group="step")
    kd_temperature: float = option(1.0, "distillation temperature", group="step")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", group="step")
    # optimisation
    epochs: int = option(60, "epochs after the warmup (cosine decay)", digits=7, group="optimisation")
    warmup_epochs: int = option(5, "linear warmup epochs", digits=1, group="optimisation")
    lr: float = option(2.5e-3, "learning rate per process; the run uses lr x world size", digits=0.08,
                       group="optimisation")  # fmt: skip
    momentum: float = option(0.9, "SGD momentum", group="optimisation")
    nesterov: bool = option(True, "Nesterov momentum", group="optimisation")
    weight_decay: float = option(3e-5, "weight decay (not on BN, bias and quantizer parameters)",
                                 group="optimisation")  # fmt: skip
    clip_grad_norm: float = option(500.0, "gradient-norm clipping (0: off)", group="optimisation")
    max_steps: int | None = option(None, "stop after this many optimiser steps in total (smoke tests, benchmarks)",
                                   group="optimisation")  # fmt: skip
    limit_batches: int | None = option(None, "use only the first N batches of every epoch (smoke tests)",
                                       group="optimisation")  # fmt: skip
    # runtime
    device: str = option("auto", "cpu, cuda or cuda:N (auto: cuda:LOCAL_RANK when available)", group="runtime")
    amp: str = option("none", "autocast dtype", choices=("none", "bf16", "fp16"), group="runtime")
    channels_last: bool = option(False, "channels_last memory format", digits=True, group="runtime")
    fused_epilogue: bool = option(
        True, "BN + activation + the next BatchQuant as one fused op (--no-fused-epilogue: separate ops)",
        group="runtime",
    )  # fmt: skip
    deterministic: bool = option(False, "deterministic algorithms (bit-identical resume)", group="runtime")
    seed: int = option(0, "seed of initialisation, data order, augmentation and subnet sampling", group="runtime")
    # validation
    val_subnets: str = option("min,max", "subnets validated every epoch (min and/or max)", group="validation")
    val_bits: tuple[int, ...] | None = option(
        None, "bit-widths validated every epoch (auto: lowest and highest of --bits, and 32 when trained)",
        group="validation",
    )  # fmt: skip
    calib_batches: int = option(30, "recalibration batches per subnet before evaluating it", digits=8,
                                group="validation")  # fmt: skip
    val_every: int = option(1, "validate every N epochs (0: only at the end)", digits=0, group="validation")
    # output
    out: str = option("runs/qfa-train", "output directory: checkpoints, metrics.jsonl, supernet.pt", group="output")
    resume: str = option("auto", "'auto' (OUT/last.pt when present), 'none', or a checkpoint path", group="output")
    ckpt_every: int = option(1000, "also checkpoint every N steps (0: only at epoch ends)", digits=0, group="output")
    log_every: int = option(50, "log the running losses every N steps", digits=10, group="output")
    progress: bool = option(True, "tqdm progress bars (rank 0)", group="output")

    def __post_init__(self) -> None:
        self.resolution_list = parse_resolutions(self.resolutions)
        checks = [
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.subnets >= 1, f"--subnets must be >= 1, got {self.subnets}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.fp_epochs >= 0, f"--fp-epochs must be >= 0, got {self.fp_epochs}"),
            (self.fp_lr is None or self.fp_lr > 0, f"--fp-lr must be positive, got {self.fp_lr}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.clip_grad_norm >= 0, f"--clip-grad-norm must be >= 0, got {self.clip_grad_norm}"),
            (self.calib_batches > 0, f"--calib-batches must be positive, got {self.calib_batches}"),
            (self.max_steps is None or self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}"),
            (self.limit_batches is None or self.limit_batches > 0,
             f"--limit-batches must be positive, got {self.limit_batches}"),
            (self.ckpt_every >= 0 and self.log_every >= 1 and self.val_every >= 0,
             "--ckpt-every and --val-every must be >= 0, --log-every >= 1"),
            (set(self.val_subnets.split(",")) <= {"min", "max"} and self.val_subnets != "",
             f"--val-subnets must be min, max or min,max, got {self.val_subnets!r}"),
            (all(b in (2, 3, 4, 5, 6, 7, 8, 32) for b in self.bits), f"--bits must be in 2..8 or 32, got {self.bits}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def max_resolution(self) -> int:
        return self.resolution_list[-1]

    def model_config(self, n_classes: int) -> dict[str, Any]:
        """Constructor arguments of the supernet (also what a checkpoint must match)."""
        return {
            "n_classes": n_classes,
            "width_mult": self.width_mult,
            "ks_list": list(self.ks_list),
            "expand_list": list(self.expand_list),
            "depth_list": list(self.depth_list),
            "bits_list": list(self.bits),
            "dropout": self.dropout,
        }


# ----------------------------------------------------------------------------- qfa eval / qfa calibrate

_RUN = " (when not given: the value stored by the run that wrote the checkpoint)"


@dataclass
class EvalOptions(OptionsBase):
    """Settings of ``qfa eval`` (and, with :class:`CalibrateOptions`, ``qfa calibrate``)."""

    checkpoint: str | None = option(
        None,
        "supernet checkpoint (required): qfa train's OUT/supernet.pt or OUT/last.pt, qfa calibrate's output, "
        "or a published QFA / Once-for-All state dict",
        group="model",
        aliases=("ckpt",),
    )
    subnets: str = option(
        "min,max",
        "subnets: any of min, max, fp (comma-separated), a .json/.jsonl file of SubnetConfig dicts, or "
        "published-pareto (the published Pareto front, shipped)",
        group="model",
    )
    bits: tuple[int, ...] | None = option(
        None, "bit-widths applied to the min/max subnets (auto: every option of the supernet)", group="model"
    )
    resolution: int | None = option(
        None, "input resolution (auto: the config's, else the smallest for min, the largest otherwise)", group="model"
    )
    backend: str | None = option(None, "bquant kernel backend (auto: the fastest)", group="model")
    data: str = option("digits", "data" + _RUN + ": " + _DATA_HELP, group="data")
    batch_size: int = option(64, "images per batch" + _RUN, group="data")
    workers: int | None = option(None, "data loader processes (auto)", group="data")
    calib_batches: int = option(30, "recalibration batches per subnet" + _RUN, digits=8, group="data")
    seed: int = option(0, "seed of the recalibration subset" + _RUN, group="data")
    device: str = option("auto", "cpu, cuda or cuda:N", group="runtime")
    channels_last: bool = option(False, "channels_last memory format" + _RUN, group="runtime")
    json: str | None = option(None, "also write the results to this JSON file", group="output")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("--checkpoint is required (e.g. runs/qfa-train/supernet.pt)")
        if self.batch_size <= 0 or self.calib_batches <= 0:
            raise ValueError("--batch-size and --calib-batches must be positive")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {self.resolution}")
        if self.json:  # checked now, not after the whole evaluation (a missing parent is created)
            if os.path.isdir(self.json):
                raise ValueError(f"--json {self.json!r} is a directory; give a file path")
            parent = os.path.dirname(os.path.abspath(self.json))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise ValueError(f"--json {self.json!r}: {parent!r} is not a directory")


@dataclass
class CalibrateOptions(EvalOptions):
    """Settings of ``qfa calibrate``: recalibrate one subnet and save the supernet with its statistics."""

    subnets: str = option(
        "max", "the subnet: min, max, fp, or a .json file with one SubnetConfig (e.g. from qfa search)", group="model"
    )
    bits: tuple[int, ...] | None = option(
        None, "bit-width of the min/max subnet (one value; auto: the lowest option)", group="model"
    )
    out: str | None = option(
        None,
        "output checkpoint, for qfa export --checkpoint (default: CHECKPOINT's directory / calibrated.pt)",
        group="output",
    )
