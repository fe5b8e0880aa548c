"""ONNX export of a static quantized subnet with QuantizeLinear / DequantizeLinear, and its integer side file.

Every quantized conv / linear becomes ``act Q/DQ -> Conv(or Gemm) with a DequantizeLinear'd int8
weight -> BatchNormalization -> activation (-> SE)``.

Weights (LSQ, spec 2): ``w_int = round(clamp(W / |s|, Qn, Qp))`` is stored as an int8 initializer
(symmetric: zero point 0; any bit-width <= 8 fits) and ``DequantizeLinear(w_int, |s|)`` gives exactly
the PyTorch weight ``|s| * w_int``.

Activations (BatchQuant, spec 1) quantize with the calibrated range: observer ``S, z`` from
``lo_hi``, multiplier ``l = softplus(theta)``, offset ``o`` (in steps)::

    q = round(clamp(x * l / S + z + o, qmin, qmax)),   y = (q - z - o) * S / l

With the step ``D = S / l`` this is ``q = round(clamp(x / D + o + z))``. ONNX zero points are
integers and ``o`` is not, so ``o`` is folded into full-precision adds around the Q/DQ pair::

    x' = x + o * D                                  (Add; skipped when o == 0)
    x' = Clip(x', (qmin - z) * D, (qmax - z) * D)   (the b-bit grid inside uint8; skipped for b = 8)
    q  = QuantizeLinear(x', D, z)                   (uint8, round half to even, as the spec)
    y  = DequantizeLinear(q, D, z) - o * D          (Sub; skipped when o == 0)

which is the spec's formula exactly in real arithmetic (``z`` is an integer, so ``round(v + z) =
round(v) + z``). Float32 evaluates the two in a different order, so an element lying within
rounding error of a bin edge may land one step away (as the spec already allows between backends);
the network output then differs slightly from PyTorch. A deployment tool that wants integer kernels
reads ``D``, ``z``, ``o`` and the bit-width from the metadata / side file: the ``- o * D`` shift
folds into the next layer's bias for 1x1 convs and the linear layer (``W (y + c) = W y + W c``),
and into the pad value for padded convs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bquant_kernels import BatchQuantizer, LSQQuantizer
from bquant_kernels.qparams import LN2, MIN_SCALE, SOFTPLUS_THRESHOLD, batchquant_grid, lsq_grid
from qfa.export.standalone import quantized_layers
from qfa.io import atomic_path, atomic_write_bytes
from qfa.networks.subnet import MobileNetV3Subnet
from qfa.nn import QConv2d, QLinear

OPSET = 17
IR_VERSION = 9  # widely supported; opset 17 needs IR >= 8
INPUT_NAME, OUTPUT_NAME = "images", "logits"


# ----------------------------------------------------------------------------- quantizer parameters


@dataclass(frozen=True)
class ActivationQParams:
    """Evaluation-time BatchQuant parameters, in the float32 values the kernels use."""

    bits: int
    signed: bool
    qmin: int
    qmax: int
    scale: float  # observer S
    zero_point: int  # observer z
    multiplier: float  # l = softplus(theta; beta = ln 2)
    offset: float  # o, in quantization steps

    @property
    def step(self) -> float:
        """The quantization step ``S / l`` (float32)."""
        return float(np.float32(np.float64(self.scale) / np.float64(self.multiplier)))


def activation_qparams(q: BatchQuantizer) -> ActivationQParams:
    """``S, z, l, o`` of a quantizer in eval mode, from its ``lo_hi``, ``theta`` and ``offset`` (spec 1.2-1.3).

    Mirrors the kernels: the observer runs in float64, ``S`` is rounded to float32 and ``z`` is
    derived from that float32 ``S``.
    """
    qmin, qmax = batchquant_grid(q.bits, q.signed)
    lo, hi = (float(v) for v in q.lo_hi.detach().double().cpu())
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    if hi0 == lo0:
        scale, zero = 1.0, 0.0
    else:
        scale = float(np.float32(max((hi0 - lo0) / (qmax - qmin), MIN_SCALE)))
        zero = min(max(qmin - float(np.round(lo0 / scale)), qmin), qmax)
    theta = float(q.theta.detach().double().cpu().reshape(()))
    l = theta if theta * LN2 > SOFTPLUS_THRESHOLD else math.log1p(math.exp(theta * LN2)) / LN2
    return ActivationQParams(
        bits=q.bits,
        signed=q.signed,
        qmin=int(qmin),
        qmax=int(qmax),
        scale=scale,
        zero_point=int(zero),
        multiplier=float(np.float32(l)),
        offset=float(q.offset.detach().float().cpu().reshape(())),
    )


@torch.no_grad()
def weight_integers(weight: torch.Tensor, q: LSQQuantizer) -> tuple[np.ndarray, float]:
    """``(w_int int8, |s|)`` with ``|s| * w_int`` equal to the LSQ forward output (float32)."""
    qn, qp = lsq_grid(q.bits, q.signed)
    step = q.step.detach().float().abs().reshape(())
    w_int = torch.round(torch.clamp(weight.detach().float() / step, qn, qp))
    return w_int.to(torch.int8).cpu().numpy(), float(step)


# ----------------------------------------------------------------------------- graph building


class _Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count: dict[str, int] = {}

    def name(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def const(self, hint: str, value: np.ndarray | float | int, dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _activation_qdq(g: _Graph, x: str, q: BatchQuantizer, prefix: str) -> str:
    p = activation_qparams(q)
    step = np.float32(p.step)
    zp_dtype = np.int8 if p.signed else np.uint8
    shift = np.float32(np.float64(p.offset) * np.float64(step))
    if shift != 0:
        x = g.op("Add", [x, g.const(f"{prefix}.act_shift", shift)], f"{prefix}.act_shifted")
    container = (-128, 127) if p.signed else (0, 255)
    if (p.qmin, p.qmax) != container:  # narrower grid than the 8-bit container: clip to it first
        lo = np.float32((p.qmin - p.zero_point) * np.float64(step))
        hi = np.float32((p.qmax - p.zero_point) * np.float64(step))
        x = g.op(
            "Clip", [x, g.const(f"{prefix}.act_min", lo), g.const(f"{prefix}.act_max", hi)], f"{prefix}.act_clipped"
        )
    scale = g.const(f"{prefix}.act_scale", step)
    zero = g.const(f"{prefix}.act_zero_point", p.zero_point, zp_dtype)
    qx = g.op("QuantizeLinear", [x, scale, zero], f"{prefix}.act_q")
    y = g.op("DequantizeLinear", [qx, scale, zero], f"{prefix}.act_dq")
    if shift != 0:
        y = g.op("Sub", [y, g.const(f"{prefix}.act_unshift", shift)], f"{prefix}.act_unshifted")
    return y


def _weight(g: _Graph, weight: torch.Tensor, q: LSQQuantizer | None, prefix: str) -> str:
    if q is None:
        return g.const(f"{prefix}.weight", weight.detach().float().cpu().numpy())
    w_int, step = weight_integers(weight, q)
    w = g.const(f"{prefix}.weight_int", w_int, np.int8)
    return g.op(
        "DequantizeLinear",
        [w, g.const(f"{prefix}.weight_scale", np.float32(step)), g.const(f"{prefix}.weight_zero_point", 0, np.int8)],
        f"{prefix}.weight_dq",
    )


def _activation(g: _Graph, x: str, act: nn.Module, prefix: str) -> str:
    if isinstance(act, nn.ReLU):
        return g.op("Relu", [x], f"{prefix}.relu")
    if isinstance(act, nn.Hardswish):
        return g.op("HardSwish", [x], f"{prefix}.h_swish")
    if isinstance(act, nn.Identity):
        return x
    raise TypeError(f"{prefix}: unsupported activation {type(act).__name__}")


def _fp32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _fp_conv(g: _Graph, x: str, conv: nn.Conv2d, name: str) -> str:
    """A full-precision 1x1 conv with bias (the SE layers)."""
    return g.op(
        "Conv", [x, g.const(f"{name}.weight", _fp32(conv.weight)), g.const(f"{name}.bias", _fp32(conv.bias))], name
    )


def _conv(g: _Graph, x: str, layer: QConv2d, prefix: str) -> str:
    if layer.a_quantizer is not None:
        x = _activation_qdq(g, x, layer.a_quantizer, prefix)
    w = _weight(g, layer.weight, layer.w_quantizer, prefix)
    k, p = layer.kernel_size, layer.padding
    y = g.op(
        "Conv",
        [x, w],
        f"{prefix}.conv",
        kernel_shape=[k, k],
        strides=[layer.stride] * 2,
        pads=[p] * 4,
        group=layer.groups,
    )
    if layer.bn is not None:
        bn = layer.bn
        y = g.op(
            "BatchNormalization",
            [
                y,
                g.const(f"{prefix}.bn.weight", _fp32(bn.weight)),
                g.const(f"{prefix}.bn.bias", _fp32(bn.bias)),
                g.const(f"{prefix}.bn.running_mean", _fp32(bn.running_mean)),
                g.const(f"{prefix}.bn.running_var", _fp32(bn.running_var)),
            ],
            f"{prefix}.bn",
            epsilon=float(bn.eps),
        )
    y = _activation(g, y, layer.act, prefix)
    if layer.se is not None:
        se = layer.se
        s = g.op("GlobalAveragePool", [y], f"{prefix}.se.pool")
        s = g.op("Relu", [_fp_conv(g, s, se.reduce, f"{prefix}.se.reduce")], f"{prefix}.se.relu")
        s = _fp_conv(g, s, se.expand, f"{prefix}.se.expand")
        s = g.op("HardSigmoid", [s], f"{prefix}.se.h_sigmoid", alpha=1.0 / 6.0, beta=0.5)
        y = g.op("Mul", [y, s], f"{prefix}.se.scale")
    return y


def _linear(g: _Graph, x: str, layer: QLinear, prefix: str) -> str:
    if layer.a_quantizer is not None:
        x = _activation_qdq(g, x, layer.a_quantizer, prefix)
    w = _weight(g, layer.weight, layer.w_quantizer, prefix)
    return g.op("Gemm", [x, w, g.const(f"{prefix}.bias", _fp32(layer.bias))], f"{prefix}.gemm", transB=1)


def to_onnx(net: MobileNetV3Subnet, resolution: int, metadata: dict[str, Any] | None = None) -> onnx.ModelProto:
    """The ONNX model of a static subnet (eval semantics) for ``resolution`` x ``resolution`` inputs."""
    g = _Graph()
    x = _conv(g, INPUT_NAME, net.first_conv, "first_conv")
    for i, block in enumerate(net.blocks):
        prefix = f"blocks.{i}.conv"
        y = x
        if block.conv.inverted_bottleneck is not None:
            y = _conv(g, y, block.conv.inverted_bottleneck, f"{prefix}.inverted_bottleneck")
        y = _conv(g, y, block.conv.depth_conv, f"{prefix}.depth_conv")
        y = _conv(g, y, block.conv.point_linear, f"{prefix}.point_linear")
        x = g.op("Add", [y, x], f"blocks.{i}.residual") if block.shortcut else y
    x = _conv(g, x, net.final_expand_layer, "final_expand_layer")
    x = g.op("GlobalAveragePool", [x], "pool")
    x = _conv(g, x, net.feature_mix_layer, "feature_mix_layer")
    x = g.op("Flatten", [x], "flatten", axis=1)
    out = _linear(g, x, net.classifier, "classifier")  # dropout is the identity in eval
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name=OUTPUT_NAME))
    graph = helper.make_graph(
        g.nodes,
        "qfa_subnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, resolution, resolution])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", net.classifier.out_features])],
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="qfa"
    )
    meta = {"config": json.dumps(net.config.to_dict()), "resolution": str(resolution)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(
    net: MobileNetV3Subnet, path: str | os.PathLike, resolution: int, metadata: dict[str, Any] | None = None
) -> None:
    """Write :func:`to_onnx` to ``path`` atomically."""
    atomic_write_bytes(path, to_onnx(net, resolution, metadata).SerializeToString())


# ----------------------------------------------------------------------------- integer side file


def deployment_arrays(net: nn.Module) -> dict[str, np.ndarray]:
    """Integer weights and every quantization parameter, keyed by layer name, plus the FP tensors.

    Per quantized layer ``L``: ``L.weight_int`` (int8), ``L.weight_scale``, ``L.w_bits``;
    ``L.act_step`` (``S / l``), ``L.act_zero_point``, ``L.act_offset`` (steps), ``L.act_bits``,
    ``L.act_qmin`` / ``L.act_qmax``, and the raw ``L.act_scale`` / ``L.act_multiplier``. Full-precision
    tensors (unquantized weights, BN, SE, biases) are stored under ``fp.<state-dict key>``.
    """
    out: dict[str, np.ndarray] = {}
    skip: set[str] = set()
    for name, layer in quantized_layers(net):
        if layer.w_quantizer is not None:
            w_int, step = weight_integers(layer.weight, layer.w_quantizer)
            out[f"{name}.weight_int"] = w_int
            out[f"{name}.weight_scale"] = np.float32(step)
            out[f"{name}.w_bits"] = np.int32(layer.w_quantizer.bits)
            skip.add(f"{name}.weight")
        if layer.a_quantizer is not None:
            p = activation_qparams(layer.a_quantizer)
            out[f"{name}.act_step"] = np.float32(p.step)
            out[f"{name}.act_scale"] = np.float32(p.scale)
            out[f"{name}.act_multiplier"] = np.float32(p.multiplier)
            out[f"{name}.act_zero_point"] = np.int32(p.zero_point)
            out[f"{name}.act_offset"] = np.float32(p.offset)
            out[f"{name}.act_bits"] = np.int32(p.bits)
            out[f"{name}.act_qmin"] = np.int32(p.qmin)
            out[f"{name}.act_qmax"] = np.int32(p.qmax)
    for key, t in net.state_dict().items():
        if key in skip or "quantizer." in key or not t.is_floating_point():
            continue
        out[f"fp.{key}"] = t.detach().float().cpu().numpy()
    return out


def save_deployment_npz(net: nn.Module, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to any other name
        np.savez(tmp, **deployment_arrays(net))


# ----------------------------------------------------------------------------- running


def run_onnx(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Logits of an exported model under onnxruntime (CPU)."""
    import onnxruntime as ort  # optional heavy dependency: only for running an exported model

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})[0]
