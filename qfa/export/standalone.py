"""Standalone static quantized models: an architecture description + a state dict, no supernet.

:func:`export_subnet` takes a recalibrated supernet with an active subnet, extracts the static
network (:meth:`QFAMobileNetV3.get_active_subnet`) and stores every quantized weight already on its
LSQ grid (``|s| * round(clamp(W / |s|))``; re-quantizing it is the identity, so the file holds what
a deployment would run, not the latent weights). :func:`load_standalone` rebuilds the network from
the description with the static layers of :mod:`qfa.nn` and gives bit-identical outputs.

File layout (``torch.save`` of plain types and tensors, loadable with ``weights_only=True``)::

    {"format": "qfa-standalone", "format_version": 1, "arch": {...}, "config": {...},
     "state_dict": {...}, "metadata": {...}}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bquant_kernels import lsq
from qfa.config import SubnetConfig
from qfa.io import atomic_save
from qfa.networks.blocks import MBConv, ResidualBlock
from qfa.networks.subnet import MobileNetV3Subnet
from qfa.nn import QConv2d, QLinear

STANDALONE_FORMAT = "qfa-standalone"
STANDALONE_FORMAT_VERSION = 1
_ACT_NAMES = {nn.ReLU: "relu", nn.Hardswish: "h_swish", nn.Identity: None}
# Constructor arguments of the static layers that are plain attributes (described and rebuilt as they are).
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "groups", "w_bits", "a_bits")
_LINEAR_ARGS = ("in_features", "out_features", "w_bits", "a_bits")


# ----------------------------------------------------------------------------- description


def _act_name(module: nn.Module) -> str | None:
    for cls, name in _ACT_NAMES.items():
        if type(module) is cls:
            return name
    raise TypeError(f"unsupported activation module {type(module).__name__} in a static subnet")


def describe_conv(layer: QConv2d) -> dict[str, Any]:
    args = {k: getattr(layer, k) for k in _CONV_ARGS}
    return {**args, "bn": layer.bn is not None, "act": _act_name(layer.act), "se": layer.se is not None}


def describe_linear(layer: QLinear) -> dict[str, Any]:
    return {k: getattr(layer, k) for k in _LINEAR_ARGS}


def describe(net: MobileNetV3Subnet) -> dict[str, Any]:
    """JSON-serialisable architecture of a static subnet (everything :func:`build` needs)."""
    blocks = []
    for block in net.blocks:
        conv = block.conv
        blocks.append(
            {
                "shortcut": bool(block.shortcut),
                "inverted_bottleneck": None
                if conv.inverted_bottleneck is None
                else describe_conv(conv.inverted_bottleneck),
                "depth_conv": describe_conv(conv.depth_conv),
                "point_linear": describe_conv(conv.point_linear),
            }
        )
    return {
        "first_conv": describe_conv(net.first_conv),
        "blocks": blocks,
        "final_expand_layer": describe_conv(net.final_expand_layer),
        "feature_mix_layer": describe_conv(net.feature_mix_layer),
        "dropout": float(net.dropout.p),
        "classifier": describe_linear(net.classifier),
    }


def _build_conv(d: dict[str, Any]) -> QConv2d:
    return QConv2d(**{k: d[k] for k in _CONV_ARGS}, bn=d["bn"], act=d["act"], se=d["se"])


def build(arch: dict[str, Any], config: SubnetConfig, backend: str | None = None) -> MobileNetV3Subnet:
    """An uninitialised static subnet with the architecture ``arch`` (see :func:`describe`)."""
    blocks = []
    for b in arch["blocks"]:
        ib = None if b["inverted_bottleneck"] is None else _build_conv(b["inverted_bottleneck"])
        conv = MBConv(ib, _build_conv(b["depth_conv"]), _build_conv(b["point_linear"]))
        blocks.append(ResidualBlock(conv, b["shortcut"]))
    net = MobileNetV3Subnet(
        _build_conv(arch["first_conv"]),
        blocks,
        _build_conv(arch["final_expand_layer"]),
        _build_conv(arch["feature_mix_layer"]),
        arch["dropout"],
        QLinear(**{k: arch["classifier"][k] for k in _LINEAR_ARGS}),
        config=config,
    )
    net.backend = backend
    return net


# ----------------------------------------------------------------------------- export / load


def quantized_layers(net: nn.Module) -> list[tuple[str, QConv2d | QLinear]]:
    """``(name, layer)`` of every conv/linear layer of a static subnet, in module order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (QConv2d, QLinear))]


@torch.no_grad()
def snap_weights_to_grid(net: nn.Module) -> None:
    """Replace every LSQ-quantized weight by its quantized value (the forward output is unchanged)."""
    for _, layer in quantized_layers(net):
        q = layer.w_quantizer
        if q is not None:
            layer.weight.copy_(lsq(layer.weight, q.step, q.bits, signed=q.signed, backend=q.backend))


def export_subnet(
    model: nn.Module, path: str | os.PathLike, resolution: int | None = None, **metadata: Any
) -> nn.Module:
    """Write the supernet's active (recalibrated) subnet as a standalone model; returns the static net.

    ``resolution`` is the input size the subnet was selected for (stored with the config).
    """
    net = model.get_active_subnet().eval()
    snap_weights_to_grid(net)
    config = model.get_active_config()
    config.resolution = resolution
    state = {
        "format": STANDALONE_FORMAT,
        "format_version": STANDALONE_FORMAT_VERSION,
        "arch": describe(net),
        "config": config.to_dict(),
        "n_classes": int(net.classifier.out_features),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "metadata": dict(metadata),
    }
    atomic_save(state, path)
    return net


def load_standalone(
    path: str | os.PathLike, *, backend: str | None = None, map_location: str | torch.device = "cpu"
) -> MobileNetV3Subnet:
    """Rebuild a model written by :func:`export_subnet` (eval mode). ``backend``: bquant_kernels backend."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"standalone model not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STANDALONE_FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a qfa standalone model (format={fmt!r})")
    if state["format_version"] > STANDALONE_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {state['format_version']} is newer than this qfa understands")
    config = SubnetConfig.from_dict(state["config"])
    with torch.device(map_location):
        net = build(state["arch"], config, backend=backend)
    net.load_state_dict(state["state_dict"], strict=True)
    net.metadata = state.get("metadata", {})
    return net.eval()
