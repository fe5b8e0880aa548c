"""The op layer: input validation, backend selection, torch.library registration (opcheck,
torch.compile without graph breaks), straight-through gradients, host-sync freedom, properties."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import pytest
import spec_oracle as oracle
import torch
from helpers import assert_quant_close, make_activation
from hypothesis import given, settings
from hypothesis import strategies as st

import bquant_kernels as bk
from bquant_kernels.backends import resolve


def _xto(shape=(2, 3, 4, 4)):
    x = make_activation(shape).float().requires_grad_(True)
    return x, torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.ones(2, 3, dtype=torch.int32)), TypeError, "x must be a floating tensor"),
        (dict(x=torch.ones(5)), ValueError, "x must have at least 2 dimensions"),
        (dict(x=torch.ones(0, 3)), ValueError, "x must not be empty"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(bits=1), ValueError, r"bits must be in \[2, 8\]"),
        (dict(bits=9), ValueError, r"bits must be in \[2, 8\]"),
        (dict(bits=4.0), TypeError, "bits must be an int"),
        (dict(theta=torch.zeros(2)), ValueError, "theta must have exactly 1 element"),
        (dict(offset=torch.zeros(1, 2)), ValueError, "offset must have exactly 1 element"),
        (dict(offset=torch.zeros(1, dtype=torch.int64)), TypeError, "offset must be a floating tensor"),
        (dict(lo_hi=torch.zeros(3)), ValueError, "lo_hi must have exactly 2 element"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_batchquant_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(x=torch.randn(2, 3, 4), theta=torch.zeros(1), offset=torch.zeros(1), bits=4)
    args.update(kwargs)
    call_kwargs = {k: args.pop(k) for k in ("lo_hi", "backend") if k in args}
    with pytest.raises(exc, match=match):
        bk.batchquant(args["x"], args["theta"], args["offset"], args["bits"], **call_kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bits=0), ValueError, r"bits must be in \[1, 8\]"),
        (dict(bits=9), ValueError, r"bits must be in \[1, 8\]"),
        (dict(step=torch.ones(2)), ValueError, "step must have exactly 1 element"),
        (dict(w=torch.ones(3, dtype=torch.int8)), TypeError, "w must be a floating tensor"),
        (dict(w=torch.ones(0)), ValueError, "w must not be empty"),
        (dict(numel_full=2), ValueError, "numel_full must be an int >= w.numel"),
    ],
)
def test_lsq_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(w=torch.randn(4, 3), step=torch.ones(1), bits=4)
    args.update(kwargs)
    extra = {"numel_full": args.pop("numel_full")} if "numel_full" in args else {}
    with pytest.raises(exc, match=match):
        bk.lsq(args["w"], args["step"], args["bits"], **extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-mismatch check needs a CUDA device")
def test_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match="theta is on cpu"):
        bk.batchquant(torch.randn(2, 3, device="cuda"), torch.zeros(1), torch.zeros(1, device="cuda"), 4)


def test_device_mismatch_is_an_error_meta():
    # The check is device-generic: a meta-device parameter with a CPU input is already a mismatch.
    with pytest.raises(ValueError, match="theta is on meta but the input is on cpu"):
        bk.batchquant(torch.randn(2, 3), torch.zeros(1, device="meta"), torch.zeros(1), 4)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BQUANT_BACKEND", "cuda")
    with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
        bk.batchquant(torch.randn(2, 3), torch.zeros(1), torch.zeros(1), 4)


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("BQUANT_BACKEND", "reference")
    assert resolve(None, torch.device("cpu"), torch.float32) == "reference"
    monkeypatch.delenv("BQUANT_BACKEND")
    expected = "cpu" if bk.backends()["cpu"][0] else "reference"
    assert resolve(None, torch.device("cpu"), torch.float32) == expected


def test_backends_report():
    report = bk.backends()
    assert set(report) == {"reference", "cpu", "triton", "cuda"}
    assert report["reference"][0] is True
    for ok, why in report.values():
        assert isinstance(ok, bool) and isinstance(why, str) and why


# ----------------------------------------------------------------------------- autograd


def _surrogate(x, theta, offset, qp, bits, signed):
    """Spec 1.4 written with autograd primitives: round as identity plus a constant (the
    straight-through estimator), softplus and clamp differentiated by torch. Away from the clamp
    bounds its autograd derivative is exactly the gradient table of spec 1.5."""
    qmin, qmax = oracle.grid(bits, signed)
    S, z = qp[2], qp[3]
    l = torch.nn.functional.softplus(theta, beta=float(np.log(2.0)), threshold=20.0)
    u = torch.clamp(x * l / S + z + offset, qmin, qmax)
    q = u + (torch.round(u) - u).detach()
    return (q - z - offset) * S / l


@pytest.mark.parametrize("bits,signed", [(2, False), (4, True), (8, False)])
def test_straight_through_gradient_matches_autograd_formulation(bits, signed):
    """gradcheck-style: the backward equals autograd through an independent formulation."""
    x = make_activation((3, 4, 5), seed=bits).requires_grad_(True)
    theta = torch.tensor([0.37], dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([0.21], dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    y, _ = bk.batchquant(x, theta, offset, bits, signed=signed, return_range=True, backend="reference")
    y.backward(g)
    qp = torch.ops.bquant.batchquant_fwd(x.detach(), theta.detach(), offset.detach(), None, bits, signed, "reference")[
        1
    ]
    xs, ts, os_ = (t.detach().clone().requires_grad_(True) for t in (x, theta, offset))
    _surrogate(xs, ts, os_, qp, bits, signed).backward(g)
    torch.testing.assert_close(x.grad, xs.grad)
    torch.testing.assert_close(theta.grad, ts.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(offset.grad, os_.grad, rtol=1e-9, atol=1e-12)


def test_lsq_gradient_matches_autograd_formulation():
    w = (torch.randn(6, 5, dtype=torch.float64) * 0.3).requires_grad_(True)
    step = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(w)
    bk.lsq(w, step, 3, backend="reference").backward(g)
    # LSQ: w_hat = s * round(clamp(w / s)); STE on round, gradient scale k on s.
    k = bk.lsq_grad_scale(w.numel(), 3)
    ws = w.detach().clone().requires_grad_(True)
    s = step.detach().clone().requires_grad_(True)
    s_scaled = s * k + (s - s * k).detach()  # value s, gradient k
    v = ws / s_scaled
    vq = torch.clamp(v, -4, 3)
    vq = vq + (torch.round(vq) - vq).detach()
    (vq * s_scaled).backward(g)
    torch.testing.assert_close(w.grad, ws.grad)
    torch.testing.assert_close(step.grad, s.grad)


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_custom_ops(backend):
    """The opaque kernel ops of the Python backends (what torch.compile traces inside the autograd.Functions):
    schema and fake implementations. They carry no autograd of their own, so they get detached inputs."""
    if not bk.backends()[backend][0]:
        pytest.skip(f"backend {backend!r} unavailable: {bk.backends()[backend][1]}")
    x = make_activation((2, 3, 4, 5)).float()
    t = torch.tensor([0.2])
    o = torch.tensor([0.1])
    torch.library.opcheck(torch.ops.bquant.batchquant_fwd, (x, t, o, None, 3, False, backend))
    torch.library.opcheck(torch.ops.bquant.batchquant_fwd, (x, t, o, torch.tensor([-1.0, 2.0]), 3, True, backend))
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.bquant.batchquant_fwd, (xcl, t, o, None, 4, False, backend))
    y, qp = torch.ops.bquant.batchquant_fwd(x, t, o, None, 3, False, backend)
    torch.library.opcheck(torch.ops.bquant.batchquant_bwd, (torch.randn_like(x), x, o, qp, 3, False, backend))
    torch.library.opcheck(torch.ops.bquant.batch_range, (x, backend))
    w = torch.randn(8, 3, 3, 3)
    s = torch.tensor([0.1])
    torch.library.opcheck(torch.ops.bquant.lsq_fwd, (w, s, 4, True, w.numel(), backend))
    torch.library.opcheck(torch.ops.bquant.lsq_bwd, (torch.randn_like(w), w, s, 4, True, 500, backend))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eager_and_compiled_routes_agree(backend):
    """Eager calls of the Python backends call the implementation from the autograd.Function; under
    torch.compile the Function is traced around the opaque kernel ops. Both give the same bits, forward
    and gradients, with no graph break."""
    ok, why = bk.backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)

    def quantize(x, t, o, w, s):
        return bk.batchquant(x, t, o, 3, backend=backend), bk.lsq(w, s, 3, numel_full=60, backend=backend)

    compiled = torch.compile(quantize, fullgraph=True, backend="aot_eager", dynamic=False)
    for x0 in (make_activation((3, 5, 4, 6)).float(), torch.randn(6, 7, generator=gen)):
        for fmt in (torch.contiguous_format, torch.channels_last) if x0.dim() == 4 else (torch.contiguous_format,):
            g, w0 = torch.randn(x0.shape, generator=gen), torch.randn(6, 5, generator=gen)
            gw = torch.randn(w0.shape, generator=gen)
            runs = []
            for fn in (quantize, compiled):
                x = x0.clone(memory_format=fmt).requires_grad_(True)
                t, o = torch.tensor([0.3], requires_grad=True), torch.tensor([0.2], requires_grad=True)
                w, s = w0.clone().requires_grad_(True), torch.tensor([0.4], requires_grad=True)
                y, w_hat = fn(x, t, o, w, s)
                torch.autograd.backward((y, w_hat), (g, gw))
                runs.append((y.detach(), x.grad, t.grad, o.grad, w_hat.detach(), w.grad, s.grad))
            assert runs[0][0].stride() == runs[1][0].stride() == runs[0][1].stride()
            for a, b in zip(*runs, strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck_native_ops(device):
    """The C++-registered ops of the cpu and cuda backends (csrc/ops.cpp): schema, fake, autograd."""
    backend = device  # the native op of each device is its compiled backend
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (GPU tests run via bench/gpu_check.sh)")
    if not bk.backends()[backend][0]:
        pytest.skip(f"backend {backend!r} unavailable: {bk.backends()[backend][1]}")
    x = make_activation((2, 3, 4, 5)).float().to(device).requires_grad_(True)
    t = torch.tensor([0.2], device=device, requires_grad=True)
    o = torch.tensor([0.1], device=device, requires_grad=True)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    xsl = x.detach()[:, ::2].requires_grad_(True)  # not dense: the op copies and restrides
    lo_hi = torch.tensor([-1.0, 2.0], device=device)
    for xi, r, signed in ((x, None, False), (x, lo_hi, True), (xcl, None, False), (xsl, None, True)):
        torch.library.opcheck(torch.ops.bquant.native_batchquant, (xi, t, o, r, 3, signed))
        torch.library.opcheck(
            torch.ops.bquant.native_batchquant_fwd, (xi.detach(), t.detach(), o.detach(), r, 3, signed)
        )
    y, qp = torch.ops.bquant.native_batchquant_fwd(x.detach(), t.detach(), o.detach(), None, 3, False)
    for g in (torch.randn_like(x), torch.randn_like(xcl)):
        torch.library.opcheck(torch.ops.bquant.native_batchquant_bwd, (g, x.detach(), o.detach(), qp, 3, False))
    torch.library.opcheck(torch.ops.bquant.native_batch_range, (xcl.detach(),))
    w = torch.randn(8, 3, 3, 3, device=device, requires_grad=True)
    s = torch.tensor([0.1], device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.bquant.native_lsq, (w, s, 4, True, 500))
    torch.library.opcheck(torch.ops.bquant.native_lsq_fwd, (w.detach(), s.detach(), 4, True, 500))
    torch.library.opcheck(torch.ops.bquant.native_lsq_bwd, (torch.randn_like(w), w.detach(), s.detach(), 2, False, 500))
    ws = [w, torch.randn(5, 7, device=device, requires_grad=True), w.detach()[:3].requires_grad_(True)]
    ss = [s, torch.tensor([-0.05], device=device, requires_grad=True), torch.tensor([0.2], device=device)]
    full = [500, 35, w.numel()]
    torch.library.opcheck(torch.ops.bquant.native_lsq_multi, (ws, ss, [4, 2, 8], True, full))
    torch.library.opcheck(
        torch.ops.bquant.native_lsq_multi_fwd, ([t.detach() for t in ws], [t.detach() for t in ss], [4, 2, 8], False)
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_native_autograd_op_matches_its_kernel_ops(device):
    """The public functions route the compiled backends through the native autograd op; its forward and
    every gradient are those of the kernel ops it calls (native_batchquant_fwd/_bwd), bit for bit, and
    the output keeps the memory format of x."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (GPU tests run via bench/gpu_check.sh)")
    if not bk.backends()[device][0]:
        pytest.skip(f"backend {device!r} unavailable: {bk.backends()[device][1]}")
    for x0 in (make_activation((3, 5, 6, 7)).float(), make_activation((4, 9)).float()):
        x0 = x0.to(device)
        layouts = (
            [x0, x0.contiguous(memory_format=torch.channels_last)] if x0.dim() == 4 else [x0, x0.t().contiguous().t()]
        )
        for xi in layouts:
            x = xi.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
            t = torch.tensor([0.3], device=device, requires_grad=True)
            o = torch.tensor([-0.2], device=device, requires_grad=True)
            y, _ = torch.ops.bquant.native_batchquant(x, t, o, None, 3, False)
            assert y.stride() == x.stride()
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
            got = (y, *torch.autograd.grad(y, (x, t, o), g))
            y_k, qp = torch.ops.bquant.native_batchquant_fwd(x.detach(), t.detach(), o.detach(), None, 3, False)
            want = (y_k, *torch.ops.bquant.native_batchquant_bwd(g, x.detach(), o.detach(), qp, 3, False))
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)


class _TinyQuantNet(torch.nn.Module):
    def __init__(self, backend=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.aq = bk.BatchQuantizer(4, backend=backend)
        self.wq = bk.LSQQuantizer(3, backend=backend)

    def forward(self, x):
        w = self.wq(self.conv.weight)
        return torch.nn.functional.conv2d(self.aq(x), w, self.conv.bias, padding=1).relu().mean()


def test_compiled_model_has_no_graph_breaks():
    torch._dynamo.reset()
    model = _TinyQuantNet()
    x = torch.randn(2, 3, 8, 8)
    model(x)  # initialises the LSQ step eagerly (first use)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, model(x))


# ----------------------------------------------------------------------------- no host sync


@contextlib.contextmanager
def _host_syncs_forbidden():
    def forbidden(*_a, **_k):
        raise AssertionError("host sync in the hot path")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
            mp.setattr(torch.Tensor, name, forbidden)
        yield


def test_no_host_sync_in_forward_backward():
    """No .item() / bool() / float() on tensors inside the ops (the hot path of every training step), nor
    in the batches of a recalibration. Leaving ``recalibrate`` may sync once: it refuses a non-finite
    range (issue 14), once per recalibration, not per batch."""
    model = _TinyQuantNet()
    x = torch.randn(2, 3, 8, 8)
    model(x)  # first use initialises the step (allowed to run once)
    with _host_syncs_forbidden():
        model(x).backward()
    with bk.recalibrate(model):
        with _host_syncs_forbidden():
            model(x)
            model(x)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 6),
    hw=st.integers(1, 7),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    theta=st.floats(-3, 3),
    offset=st.floats(-1, 1),
    seed=st.integers(0, 2**16),
)
def test_property_output_on_grid(n, c, hw, bits, signed, scale, theta, offset, seed):
    """For any shape/bits/scale: y lies on the grid (q - z - o) * S / l with q in [qmin, qmax], so at
    most 2^bits distinct values, and it matches the float64 oracle."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, hw, hw, generator=gen, dtype=torch.float64) * scale).float()
    t = torch.tensor([theta])
    o = torch.tensor([offset])
    y = bk.batchquant(x, t, o, bits, signed=signed)
    assert torch.unique(y).numel() <= 2**bits
    ref = oracle.batchquant(
        x.double().numpy(), np.ones(x.shape), float(t), float(o), bits, signed, scale_dtype=np.float32
    )
    assert_quant_close(y, ref.y, ref.scale / ref.l, torch.float32)


def test_kernel_package_imports_nothing_of_qfa():
    """bquant_kernels is the lower layer: importing it (and every backend) must not import qfa."""
    code = (
        "import sys, bquant_kernels\n"
        "from bquant_kernels.backends import NAMES, get_backend\n"
        "[get_backend(n) for n in NAMES]\n"
        "assert not [m for m in sys.modules if m == 'qfa' or m.startswith('qfa.')], 'qfa was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
