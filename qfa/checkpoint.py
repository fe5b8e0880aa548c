"""Checkpoints: our own supernet format, and loaders for the published QFA and Once-for-All layouts.

Layouts of the published checkpoints: ``tests/data/qfa-published-state-dict.tsv`` (the released QFA
supernet) and ``tests/data/ofa-mbv3-w1.2-state-dict.tsv`` (the full-precision OFA supernet); see
``tests/data/README.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bquant_kernels import BatchQuantizer

from .io import atomic_save
from .networks import QFAMobileNetV3
from .nn import DynamicQConv2d, DynamicQDepthwiseConv2d, DynamicQLinear
from .space import BLOCK_QLAYERS

FORMAT_VERSION = 1
FORMAT_KIND = "qfa-supernet"

# ----------------------------------------------------------------------------- helpers


def _unwrap_model(model: object) -> QFAMobileNetV3:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(inner, QFAMobileNetV3):
        raise TypeError(f"model must be a QFAMobileNetV3, got {type(model).__name__}")
    return inner


def _unwrap_state_dict(state_dict: object) -> dict[str, Tensor]:
    """The tensors of a state dict given bare or as ``{"state_dict": ...}``, without a DDP ``module.`` prefix."""
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state_dict).__name__}")
    out = {}
    for k, v in state_dict.items():
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


# Ours -> published: a block layer ``blocks.<i>.conv.<part>`` is ``blocks.<i>.mobile_inverted_conv.<part>``.
_BLOCK_LAYER = r"blocks\.\d+\.mobile_inverted_conv\.(?:" + "|".join(BLOCK_QLAYERS) + ")"
# What a foreign key becomes: ``{our key: value}`` (empty: ignored), or None for a key not of the layout.
Translation = Callable[[str, Tensor], dict[str, Tensor] | None]


def _translate(state_dict: Mapping[str, Tensor], translate: Translation) -> tuple[dict[str, Tensor], list[str]]:
    """``(targets, unknown keys)`` of a foreign state dict, key by key."""
    targets: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        ours = translate(key, value)
        if ours is None:
            unknown.append(key)
        else:
            targets.update(ours)
    return targets, unknown


class CheckpointKeyError(KeyError):
    """A checkpoint does not match the model: the message lists the unknown and the missing keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _apply(
    model: QFAMobileNetV3,
    source: str,
    targets: dict[str, Tensor],
    unknown: list[str],
    required: set[str],
) -> None:
    """Check keys and shapes of ``targets`` (our key -> value) against ``model``, then load them."""
    ours = model.state_dict()
    missing = sorted(required - set(targets))
    unknown = sorted(unknown + [k for k in targets if k not in ours])
    if unknown or missing:
        raise CheckpointKeyError(
            f"{source} does not match this QFAMobileNetV3: "
            f"{len(unknown)} unknown key(s) [{_listing(unknown)}]; {len(missing)} missing key(s) [{_listing(missing)}]"
        )
    bad = [
        f"{k}: {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
        for k, v in targets.items()
        if tuple(v.shape) != tuple(ours[k].shape)
    ]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {len(bad)} tensor(s): {_listing(bad)}")
    with torch.no_grad():
        model.load_state_dict({**ours, **targets}, strict=True)


# ----------------------------------------------------------------------------- published QFA layout

_QFA_LAYER = re.compile(
    r"^(?P<layer>first_conv\.conv|final_expand_layer\.conv|feature_mix_layer\.conv|classifier\.linear"
    rf"|{_BLOCK_LAYER}\.conv)\.(?P<rest>.+)$"
)
_QFA_SE = re.compile(r"^(blocks\.\d+)\.mobile_inverted_conv\.depth_conv\.se\.fc\.(reduce|expand)\.(weight|bias)$")
_QFA_PARAM = {
    "gamma": "bn.weight",
    "beta": "bn.bias",
    "running_mean": "bn.running_mean",
    "running_var": "bn.running_var",
    "conv.weight": "weight",
    "linear.weight": "weight",
    "linear.bias": "bias",
    "7to5_matrix": "kernel_transforms.7to5",
    "5to3_matrix": "kernel_transforms.5to3",
}
_QFA_QUANT = re.compile(
    r"^(?P<kind>[wa])_quantizer(?:s\.(?P<ks>\d+))?\.quantizers\.(?P<bits>\d+)\.(?P<field>scale|offset|observer\.\w+)$"
)
_IGNORED_OBSERVER = ("observer.min_val", "observer.max_val", "observer.num_batches_tracked")


def _qfa_layer_prefix(layer: str) -> str:
    """Published layer prefix to ours (``blocks.1.mobile_inverted_conv.X.conv`` -> ``blocks.1.conv.X``)."""
    layer = layer.replace(".mobile_inverted_conv.", ".conv.")
    return layer.rsplit(".", 1)[0]


def published_quantizer_name(ours: str) -> str:
    """Our quantizer group name (see :meth:`QFAMobileNetV3.quantizers`) in the published layout."""
    m = re.match(r"^(?P<layer>.+)\.(?P<q>[wa]_quantizers?(?:\.\d+)?)$", ours)
    if m is None:
        raise ValueError(f"not a quantizer group name: {ours!r}")
    layer = m["layer"]
    if layer.startswith("blocks."):
        layer = layer.replace(".conv.", ".mobile_inverted_conv.", 1) + ".conv"
    elif layer == "classifier":
        layer = "classifier.linear"
    else:
        layer += ".conv"
    return f"{layer}.{m['q']}"


def _qfa_entry(key: str, value: Tensor, ranges: dict[str, dict[str, Tensor]]) -> dict[str, Tensor] | None:
    """Our entries for one key of the published QFA layout (observer ranges are collected in ``ranges``)."""
    se = _QFA_SE.match(key)
    if se:
        return {f"{se[1]}.conv.depth_conv.se.{se[2]}.{se[3]}": value}
    m = _QFA_LAYER.match(key)
    if m is None:
        return None
    prefix, rest = _qfa_layer_prefix(m["layer"]), m["rest"]
    if rest == "num_batches_tracked":
        return {}
    if rest in _QFA_PARAM:
        return {f"{prefix}.{_QFA_PARAM[rest]}": value}
    q = _QFA_QUANT.match(rest)
    if q is None:
        return None
    bank = f"{prefix}.{q['kind']}_quantizer" + (f"s.{q['ks']}" if q["ks"] else "") + f".{q['bits']}"
    field = q["field"]
    if field in _IGNORED_OBSERVER:
        return {}
    if q["kind"] == "w":
        if field != "scale":
            return None
        return {f"{bank}.step": value.reshape(1), f"{bank}.initialized": torch.ones((), dtype=torch.bool)}
    if field in ("scale", "offset"):
        return {f"{bank}.{'theta' if field == 'scale' else 'offset'}": value.reshape(1)}
    if field in ("observer.running_min", "observer.running_max"):
        ranges.setdefault(f"{bank}.lo_hi", {})[field[len("observer.running_") :]] = value.reshape(1)
        return {}
    return None


def load_published_qfa(model: QFAMobileNetV3, state_dict: Mapping[str, Tensor]) -> QFAMobileNetV3:
    """Load the released QFA supernet (``b234_ps.pth`` layout) into ``model``.

    Activation quantizers: ``scale`` -> BatchQuantizer ``theta`` (raw), ``offset`` -> ``offset``,
    ``observer.running_min/max`` -> ``lo_hi``; weight quantizers: ``scale`` -> LSQ ``step``, marked
    initialised. BN ``gamma/beta/running_*`` -> our BN. Empty observer buffers and
    ``num_batches_tracked`` are ignored. Unknown or missing keys raise :class:`CheckpointKeyError`
    listing them; the model is unchanged on error.
    """
    model = _unwrap_model(model)
    ranges: dict[str, dict[str, Tensor]] = {}  # lo_hi key -> its "min" and "max" halves
    targets, unknown = _translate(_unwrap_state_dict(state_dict), lambda key, value: _qfa_entry(key, value, ranges))
    for key, parts in ranges.items():
        if set(parts) == {"min", "max"}:
            targets[key] = torch.cat([parts["min"], parts["max"]]).float()
    required = {k for k in model.state_dict() if not k.endswith(".initialized")}
    _apply(model, "the published QFA state dict", targets, unknown, required)
    return model


# ----------------------------------------------------------------------------- Once-for-All FP layout

_OFA_LAYER = re.compile(
    rf"^(?P<layer>first_conv|final_expand_layer|feature_mix_layer|classifier|{_BLOCK_LAYER})\.(?P<rest>.+)$"
)
_OFA_PARAM = {
    "conv.weight": "weight",
    "conv.conv.weight": "weight",
    "linear.weight": "weight",
    "linear.bias": "bias",
    "conv.7to5_matrix": "kernel_transforms.7to5",
    "conv.5to3_matrix": "kernel_transforms.5to3",
    "se.fc.reduce.weight": "se.reduce.weight",
    "se.fc.reduce.bias": "se.reduce.bias",
    "se.fc.expand.weight": "se.expand.weight",
    "se.fc.expand.bias": "se.expand.bias",
}
_OFA_BN = re.compile(r"^bn\.(?:bn\.)?(?P<name>weight|bias|running_mean|running_var|num_batches_tracked)$")


def _ofa_entry(key: str, value: Tensor) -> dict[str, Tensor] | None:
    """Our entries for one key of the Once-for-All layout."""
    m = _OFA_LAYER.match(key)
    if m is None:
        return None
    prefix, rest = m["layer"].replace(".mobile_inverted_conv.", ".conv."), m["rest"]
    bn = _OFA_BN.match(rest)
    if bn:
        return {} if bn["name"] == "num_batches_tracked" else {f"{prefix}.bn.{bn['name']}": value}
    if rest in _OFA_PARAM:
        return {f"{prefix}.{_OFA_PARAM[rest]}": value}
    return None


def load_ofa_fp(model: QFAMobileNetV3, state_dict: Mapping[str, Tensor]) -> QFAMobileNetV3:
    """Initialise ``model`` from the full-precision Once-for-All MobileNetV3 w1.2 supernet
    (``ofa_mbv3_d234_e346_k357_w1.2`` layout): conv / linear / SE weights and BN (``bn.weight/bias``
    and running statistics). The kernel-transform matrices are not in that layout: loaded when
    present, else left as they are (identity for a new model). Then every quantizer is reset: LSQ
    steps initialised from the loaded full weights (spec 2), BatchQuant at ``l = 1, o = 0`` with a
    zero running range. Unknown or missing keys raise :class:`CheckpointKeyError` listing them.
    """
    model = _unwrap_model(model)
    targets, unknown = _translate(_unwrap_state_dict(state_dict), _ofa_entry)
    required = {k for k in model.state_dict() if not _is_quantizer_key(k) and ".kernel_transforms." not in k}
    _apply(model, "the Once-for-All state dict", targets, unknown, required)
    reset_quantizers(model)
    return model


def _is_quantizer_key(key: str) -> bool:
    return re.search(r"\.[wa]_quantizers?\.", key) is not None


@torch.no_grad()
def reset_quantizers(model: nn.Module) -> None:
    """BatchQuantizers back to ``theta = offset = 0`` and a zero range; every LSQ step initialised
    from the layer's full weight (the transformed full kernel for each depthwise kernel size)."""
    for m in model.modules():
        if isinstance(m, BatchQuantizer):
            m.theta.zero_()
            m.offset.zero_()
            m.lo_hi.zero_()
            m.calibrated = False
        elif isinstance(m, (DynamicQConv2d, DynamicQLinear)):
            for q in m.w_quantizer.values():
                q.initialize(m.weight)
        elif isinstance(m, DynamicQDepthwiseConv2d):
            for ks, bank in m.w_quantizers.items():
                w_full = m.kernel(int(ks))
                for q in bank.values():
                    q.initialize(w_full)


# ----------------------------------------------------------------------------- our format


def weights_id(model: nn.Module) -> str:
    """Short fingerprint of a supernet's trained parameters (not of BN or BatchQuant statistics, which
    recalibration rewrites): samples collected from different supernets never mix."""
    import hashlib

    digest = hashlib.sha1()
    for name, p in _unwrap_model(model).named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())  # C order, whatever the strides
    return digest.hexdigest()[:12]


def save_supernet(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save ``model`` (its architecture arguments and state dict) and ``extra`` to ``path`` atomically
    (:func:`qfa.io.atomic_save`: a temporary file in the same directory, fsynced, ``os.replace``-d).
    ``extra`` should hold tensors, numbers, strings and containers of them (loadable with
    ``weights_only=True``), e.g. the epoch and optimizer state."""
    model = _unwrap_model(model)
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": FORMAT_KIND,
        "model_kwargs": model.config_kwargs,
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    atomic_save(payload, path)


def load_supernet(
    path: str | os.PathLike,
    model: QFAMobileNetV3 | None = None,
    *,
    return_extra: bool = False,
    weights_only: bool = True,
) -> QFAMobileNetV3 | tuple[QFAMobileNetV3, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_supernet` into ``model`` (built from the saved
    architecture arguments when ``None``). Returns the model, or ``(model, extra)`` with
    ``return_extra=True``. A bad file, a newer ``format_version`` or keys that do not match the
    model raise a clear error; the model is unchanged on error."""
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=weights_only)
    except OSError:
        raise  # missing or unreadable file: its own message is clear
    except Exception as err:  # zip/pickle errors of every kind; torch's text would suggest weights_only=False
        raise ValueError(f"{str(path)!r} is corrupt or not a torch checkpoint ({type(err).__name__})") from err
    if not isinstance(payload, dict) or payload.get("kind") != FORMAT_KIND or "format_version" not in payload:
        raise ValueError(f"{path} is not a qfa supernet checkpoint (no kind={FORMAT_KIND!r} / format_version)")
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{path}: format_version {version!r} is not supported (this qfa reads 1..{FORMAT_VERSION})")
    model = QFAMobileNetV3(**payload["model_kwargs"]) if model is None else _unwrap_model(model)
    sd = payload["state_dict"]
    ours = model.state_dict()
    unknown = sorted(set(sd) - set(ours))
    missing = sorted(set(ours) - set(sd))
    if unknown or missing:
        raise CheckpointKeyError(
            f"{path} does not match this QFAMobileNetV3 (saved with {payload['model_kwargs']}): "
            f"{len(unknown)} unknown key(s) [{_listing(unknown)}]; {len(missing)} missing key(s) [{_listing(missing)}]"
        )
    _apply(model, str(path), dict(sd), [], set())
    return (model, payload["extra"]) if return_extra else model


# ----------------------------------------------------------------------------- any layout

RUN_KEYS = ("data", "batch_size", "calib_batches", "seed", "channels_last")  # what eval needs to reproduce train


@dataclass
class LoadedSupernet:
    """What :func:`load_any` read: the supernet, the file's layout, and what the file says about the run
    that made it (``run``: data, batch size, recalibration settings, memory format; empty when unknown)
    and the subnet it was calibrated for (``subnet``: a SubnetConfig dict, from ``qfa calibrate``)."""

    model: QFAMobileNetV3
    layout: str
    run: dict[str, Any] = field(default_factory=dict)
    subnet: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_any(path: str | os.PathLike, n_classes: int | None = None, backend: str | None = None) -> LoadedSupernet:
    """The supernet stored at ``path`` in any layout every ``qfa`` command accepts: a qfa supernet
    (``qfa train``'s ``supernet.pt``, ``qfa calibrate``'s output), a training checkpoint (``last.pt``),
    the published QFA state dict or the Once-for-All FP state dict. The qfa layouts rebuild their own
    architecture; the published ones have the published architecture with ``n_classes`` outputs
    (required for them). Errors name the file (:class:`qfa.train.ckpt.CheckpointError`)."""
    # Imported here: qfa.train.weights builds on this module (the layout translations), so a top-level
    # import would be a cycle.
    from .train.ckpt import CheckpointError
    from .train.weights import QFA_PUBLISHED, QFA_SUPERNET, QFA_TRAIN, load_into, read_checkpoint

    layout, payload = read_checkpoint(path)
    extra: dict[str, Any] = {}
    run: dict[str, Any] = {}
    if layout == QFA_SUPERNET:
        kwargs = dict(payload["model_kwargs"])
        extra = dict(payload.get("extra") or {})
        run = dict(extra.get("run") or {})
    elif layout == QFA_TRAIN:
        kwargs = dict(payload["model_config"])
        options = payload.get("options") or {}
        run = {k: options[k] for k in RUN_KEYS if k in options}
    else:
        if n_classes is None:
            raise CheckpointError(f"{str(path)!r} ({layout} layout) does not store its number of classes: give it")
        kwargs = {"n_classes": n_classes, "bits_list": (2, 3, 4) if layout == QFA_PUBLISHED else (2, 3, 4, 32)}
    model = QFAMobileNetV3(**kwargs, backend=backend)
    load_into(model, path)
    subnet = extra.get("subnet") if isinstance(extra.get("subnet"), dict) else None
    return LoadedSupernet(model, layout, run, subnet, extra)
