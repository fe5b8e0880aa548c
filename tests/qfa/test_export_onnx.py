"""ONNX export: quantizer parameters against the float64 oracle, Q/DQ against PyTorch, whole network
under onnxruntime, and the integer side file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from bquant_kernels import BatchQuantizer, LSQQuantizer, lsq
from bquant_kernels.backends.reference import make_qparams as reference_qparams
from bquant_kernels.qparams import SCALE, ZERO, L
from qfa.export.onnx_export import (
    IR_VERSION,
    OPSET,
    _activation_qdq,
    _Graph,
    _weight,
    activation_qparams,
    deployment_arrays,
    export_onnx,
    run_onnx,
)
from qfa.export.standalone import export_subnet, load_standalone, quantized_layers
from tests.qfa.test_export_standalone import RES, calibrated_supernet

# (bits, lo, hi, theta, offset): ranges crossing zero, all positive (post-ReLU), a degenerate one,
# learned scale multipliers and offsets of both signs.
QUANTIZERS = [
    (2, -0.7, 1.3, 0.0, 0.0),
    (3, -2.0, 0.5, 0.8, -0.37),
    (4, 0.0, 3.1, -1.2, 0.41),
    (4, -0.05, 6.0, 2.5, 0.93),
    (8, -1.0, 1.0, 0.3, -0.2),
    (3, 0.0, 0.0, 0.0, 0.25),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantizer(bits, lo, hi, theta, offset) -> BatchQuantizer:
    q = BatchQuantizer(bits, signed=False).eval()
    with torch.no_grad():
        q.set_range(torch.tensor([lo, hi]))
        q.theta.fill_(theta)
        q.offset.fill_(offset)
    return q


def _run_graph(build, x: np.ndarray) -> np.ndarray:
    g = _Graph()
    out = build(g, "x")
    g.nodes.append(helper.make_node("Identity", [out], ["y"]))
    graph = helper.make_graph(
        g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], g.initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("params", QUANTIZERS)
def test_activation_qparams_match_the_oracle(params):
    bits, lo, hi, theta, _ = params
    q = _quantizer(*params)
    ours = activation_qparams(q)
    ref = reference_qparams(q.lo_hi[0], q.lo_hi[1], q.theta, bits, False, torch.float32)
    assert ours.scale == ref[SCALE].item()
    assert ours.zero_point == ref[ZERO].item()
    assert ours.multiplier == ref[L].item()
    assert ours.qmin == 0 and ours.qmax == 2**bits - 1


@pytest.mark.parametrize("params", QUANTIZERS)
def test_activation_qdq_matches_pytorch(params):
    q = _quantizer(*params)
    p = activation_qparams(q)
    g = torch.Generator().manual_seed(p.bits)
    x = torch.randn(8, 16, 9, 9, generator=g, dtype=torch.float64) * 1.5
    x[0] = x[0].clamp(min=0.0)  # exact zeros (post-ReLU)
    # Values on bin edges: x * l / S + z + o = k + 1/2.
    k = torch.randint(-3, 2**p.bits + 3, (400,), generator=g).double()
    x.view(-1)[:400] = (k + 0.5 - p.zero_point - p.offset) * p.scale / p.multiplier
    x = x.float()
    with torch.no_grad():
        ref = q(x).numpy()
    got = _run_graph(lambda g_, name: _activation_qdq(g_, name, q, "a"), x.numpy())
    step = p.step
    diff = np.abs(got - ref)
    off_by_one = np.isclose(diff, step, rtol=1e-3)
    close = diff <= 1e-6 * np.abs(ref) + 1e-6 * step
    assert np.all(close | off_by_one)
    # One-step differences come from float32 evaluation order: the planted bin edges may go either
    # way, elsewhere they are as rare as the spec allows between backends.
    assert off_by_one.reshape(-1)[400:].mean() <= 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_dequantization_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 8, 3, 3, generator=g) * 0.2
    q = LSQQuantizer(bits)
    q.initialize(w)
    with torch.no_grad():
        q.step.mul_(0.83)  # a learned step, not the init value
        ref = lsq(w, q.step, bits, signed=True).numpy()
    got = _run_graph(lambda g_, name: g_.op("Add", [_weight(g_, w, q, "w"), name], "sum"), np.zeros_like(ref))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_network_under_onnxruntime(tmp_path, seed):
    model, cfg, x = calibrated_supernet(seed, bits_list=(2, 3, 4))
    with torch.no_grad():
        ref = model(x).numpy()
    export_subnet(model, tmp_path / "net.pt", resolution=RES)
    net = load_standalone(tmp_path / "net.pt")
    export_onnx(net, tmp_path / "net.onnx", RES, metadata={"note": "t"})
    got = run_onnx(tmp_path / "net.onnx", x.numpy())
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    model_proto = onnx.load(tmp_path / "net.onnx")
    ops = [n.op_type for n in model_proto.graph.node]
    n_act = sum(layer.a_quantizer is not None for _, layer in quantized_layers(net))
    assert ops.count("QuantizeLinear") == n_act
    n_w = sum(layer.w_quantizer is not None for _, layer in quantized_layers(net))
    assert ops.count("DequantizeLinear") == n_act + n_w
    props = {p.key: p.value for p in model_proto.metadata_props}
    assert props["resolution"] == str(RES) and props["note"] == "t"


def test_deployment_arrays(tmp_path):
    model, _, _ = calibrated_supernet(2, bits_list=(2, 3, 4))
    net = export_subnet(model, tmp_path / "net.pt", resolution=RES)
    arrays = deployment_arrays(net)
    for name, layer in quantized_layers(net):
        if layer.w_quantizer is None:
            assert f"fp.{name}.weight" in arrays
            continue
        w_int = arrays[f"{name}.weight_int"]
        bits = int(arrays[f"{name}.w_bits"])
        assert w_int.dtype == np.int8 and w_int.min() >= -(2 ** (bits - 1)) and w_int.max() <= 2 ** (bits - 1) - 1
        np.testing.assert_array_equal(
            w_int.astype(np.float32) * arrays[f"{name}.weight_scale"], layer.weight.detach().numpy()
        )
        p = activation_qparams(layer.a_quantizer)
        assert int(arrays[f"{name}.act_zero_point"]) == p.zero_point
        assert float(arrays[f"{name}.act_step"]) == np.float32(p.step)
        assert 0 <= p.zero_point <= int(arrays[f"{name}.act_qmax"]) == 2 ** int(arrays[f"{name}.act_bits"]) - 1
    assert "fp.first_conv.weight" in arrays and "fp.classifier.bias" in arrays
