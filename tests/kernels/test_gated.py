"""Gated BatchQuant ``bquant_kernels.gated_batchquant`` (``batchquant(x * gate)`` in one op) against the
composition.

The oracle is the reference backend's composition (``x * gate`` then ``batchquant``, autograd through
both) on float64 copies of the inputs. Each fused backend is also compared with the composition run on
that backend in the same dtype: the forward and ``grad_x`` to the bit (the kernels round the product
where ``torch.mul`` does), the gate's and the quantizer's gradients to summation order.
"""

from __future__ import annotations

import helpers as h
import pytest
import torch

from bquant_kernels import batchquant, gated_batchquant
from bquant_kernels.gated import gated_backend

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ((4, 6, 5, 7), (3, 5, 1, 1), (7, 9), (2, 3, 11), (5, 17, 3, 3), (1, 1, 4, 4))
BACKENDS = ("cpu", "triton", "reference")


def _require(backend: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip (with the reason) unless ``backend`` runs its own gated kernels on CPU tensors of ``dtype``."""
    h.require(backend, "cpu", dtype)
    if gated_backend(backend, torch.zeros(1, 1, dtype=dtype)) != backend:
        pytest.skip(f"backend {backend!r} has no gated kernel here (the compiled extension is not built)")


def _inputs(shape, layout: str, seed: int):
    """float64 ``x`` (channels of very different ranges, signs, zeros after the gate), a gate in [0, 1] with
    exact 0 and 1 and some negative values (the op does not assume SE's hardsigmoid), theta, offset."""
    x = h.to_layout(h.make_activation(shape, seed=seed), layout)
    gen = torch.Generator().manual_seed(seed + 1)
    gate = torch.rand(shape[:2], generator=gen, dtype=torch.float64)
    flat = gate.view(-1)
    flat[::5] = 0.0
    flat[1::7] = 1.0
    flat[2::9] *= -0.5
    theta = torch.tensor([0.3], dtype=torch.float64)
    offset = torch.tensor([0.2], dtype=torch.float64)
    return x, gate, theta, offset


def _grad_y(x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    return h.to_layout(g, "contiguous" if x.is_contiguous() else "channels_last")


def _run(fn, x, gate, theta, offset, grad_y):
    """``fn``'s output, the range it used, and the gradients of x, gate, theta, offset."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate, theta, offset)]
    y, used = fn(*leaves)
    return y.detach(), used, torch.autograd.grad(y, leaves, grad_y)


def _fused(bits: int, lo_hi, backend: str, gate_shape=None):
    def fn(x, gate, theta, offset):
        g = gate if gate_shape is None else gate.reshape(gate_shape)
        return gated_batchquant(x, g, theta, offset, bits, lo_hi=lo_hi, return_range=True, backend=backend)

    return fn


def _composition(bits: int, lo_hi, backend: str):
    def fn(x, gate, theta, offset):
        z = x * gate.reshape(gate.shape + (1,) * (x.dim() - 2))
        return batchquant(z, theta, offset, bits, lo_hi=lo_hi, return_range=True, backend=backend)

    return fn


def _check_against_float64(shape, layout, bits, mode, backend, dtype, device):
    """``backend``'s op on ``device`` against the reference's float64 composition on the CPU."""
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("2-D tensors have one memory format")
    x64, gate64, theta64, offset64 = _inputs(shape, layout, sum(shape) + bits)
    lo_hi64 = torch.tensor([-0.7, 1.9], dtype=torch.float64) if mode == "eval" else None
    ref_y, ref_used, ref_grads = _run(
        _composition(bits, lo_hi64, "reference"), x64, gate64, theta64, offset64, _grad_y(x64)
    )
    x, gate, theta, offset = (t.to(device, dtype) for t in (x64, gate64, theta64, offset64))
    x = h.to_layout(x, layout)
    lo_hi = None if lo_hi64 is None else lo_hi64.to(device, dtype)
    h.poison_heap(x.numel() * x.element_size(), device)
    y, used, grads = _run(_fused(bits, lo_hi, backend), x, gate, theta, offset, _grad_y(x64).to(device, dtype))
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride() and y.device == x.device
    y, used, grads = y.cpu(), used.cpu(), [t.cpu() for t in grads]
    torch.testing.assert_close(used.double(), ref_used.double(), rtol=1e-6, atol=1e-7)
    qmin, qmax = 0, 2**bits - 1
    lo, hi = min(float(ref_used[0]), 0.0), max(float(ref_used[1]), 0.0)
    l = float(torch.nn.functional.softplus(theta64, beta=float(torch.log(torch.tensor(2.0)))))
    step = max((hi - lo) / (qmax - qmin), 2.0**-23) / l
    h.assert_quant_close(y, ref_y.numpy(), step, dtype)
    # A bin flip moves the mask of one element: the tensor gradients are compared in norm.
    for name, got, want in zip(("x", "gate"), grads[:2], ref_grads[:2], strict=True):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"grad {name}: non-finite (unwritten?) elements"
        err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
        assert err <= (1e-10 if dtype == torch.float64 else 1e-4), f"grad {name}: relative error {err:.3g}"
    scale = float((ref_grads[0].abs() * x64.abs()).sum()) + 1.0
    for name, got, want in zip(("theta", "offset"), grads[2:], ref_grads[2:], strict=True):
        h.assert_scalar_close(got, float(want), scale * 1e-3, 1e-4, f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "backend, dtype",
    [("cpu", torch.float32), ("cpu", torch.float64), ("triton", torch.float32), ("reference", torch.float32)],
)
def test_matches_float64_composition(shape, layout, bits, mode, backend, dtype):
    _require(backend, dtype)
    _check_against_float64(shape, layout, bits, mode, backend, dtype, "cpu")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_on_cuda_matches_float64_composition(shape, layout, mode, backend):
    """The Triton kernels compiled for and run on a GPU (the cuda backend's gated op is Triton's):
    bench/gpu_check.sh runs this."""
    h.require(backend, "cuda", torch.float32)
    assert gated_backend(backend, torch.zeros(1, 1, device="cuda")) == "triton"
    _check_against_float64(shape, layout, 4, mode, backend, torch.float32, "cuda")


@pytest.mark.parametrize("shape", SHAPES[::2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_same_bits_as_the_composition_on_that_backend(shape, layout, mode, backend, dtype):
    """The product rounded where ``torch.mul`` rounds it: ``y`` and ``grad_x`` bit for bit in every dtype
    (16-bit included, where the composition's rounding of ``z`` moves values across bin edges)."""
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("2-D tensors have one memory format")
    _require(backend, dtype)
    x, gate, theta, offset = (t.to(dtype) for t in _inputs(shape, layout, sum(shape)))
    theta, offset = theta.float(), offset.float()
    lo_hi = torch.tensor([-0.7, 1.9]) if mode == "eval" else None
    gy = _grad_y(x)
    want = _run(_composition(4, lo_hi, backend), x, gate, theta, offset, gy)
    h.poison_heap(x.numel() * x.element_size(), "cpu")
    got = _run(_fused(4, lo_hi, backend), x, gate, theta, offset, gy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "y / range"
    assert torch.equal(got[2][0], want[2][0]), "grad x"
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 4 * h.DTYPE_RTOL[dtype])
    scale = want[2][1].abs().max().item() + 1e-30
    torch.testing.assert_close(got[2][1], want[2][1], rtol=rtol, atol=rtol * scale)
    for got_s, want_s in zip(got[2][2:], want[2][2:], strict=True):
        torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5 * (abs(float(want_s)) + 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_as_n_c_1_1_gives_the_same_numbers_and_gradient_shape(backend):
    _require(backend)
    x, gate, theta, offset = (t.float() for t in _inputs((3, 5, 4, 4), "channels_last", 3))
    gy = _grad_y(x)
    flat = _run(_fused(4, None, backend), x, gate, theta, offset, gy)
    leaves = [t.clone().requires_grad_() for t in (x, gate.view(3, 5, 1, 1), theta, offset)]
    y = gated_batchquant(*leaves, 4, backend=backend)
    grads = torch.autograd.grad(y, leaves, gy)
    assert torch.equal(y, flat[0])
    assert grads[1].shape == (3, 5, 1, 1) and torch.equal(grads[1].view(3, 5), flat[2][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_makes_the_batch_range_nan(backend):
    _require(backend)
    x, gate, theta, offset = (t.float() for t in _inputs((2, 3, 4, 4), "contiguous", 5))
    x[1, 2, 0, 3] = float("nan")
    y, used = gated_batchquant(x, gate, theta, offset, 4, return_range=True, backend=backend)
    assert torch.isnan(used).all() and torch.isnan(y).all()


def test_result_does_not_depend_on_the_thread_count():
    _require("cpu")
    x, gate, theta, offset = (t.float() for t in _inputs((8, 40, 24, 24), "contiguous", 6))
    gy = _grad_y(x)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(_run(_fused(4, None, "cpu"), x, gate, theta, offset, gy))
    (y1, u1, g1), (y2, u2, g2) = runs
    assert torch.equal(y1, y2) and torch.equal(u1, u2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize(
    "gate, exc, match",
    [
        ("not a tensor", TypeError, "gate must be a torch.Tensor"),
        (torch.ones(2, 4), ValueError, r"gate must have shape \(2, 3\)"),
        (torch.ones(2, 3, 4, 4), ValueError, r"gate must have shape \(2, 3\) or \(2, 3, 1, 1\)"),
        (torch.ones(2, 3, dtype=torch.float64), TypeError, "gate must have the dtype of x"),
        (torch.ones(2, 3, dtype=torch.int32), TypeError, "gate must be a floating tensor"),
        (torch.ones(2, 3, device="meta"), ValueError, "gate is on meta but x is on cpu"),
    ],
)
def test_bad_gate_names_the_argument(gate, exc, match):
    with pytest.raises(exc, match=match):
        gated_batchquant(torch.randn(2, 3, 4, 4), gate, torch.zeros(1), torch.zeros(1), 4)


def test_bad_bits_and_params_name_the_argument():
    x, gate = torch.randn(2, 3, 4, 4), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
        gated_batchquant(x, gate, torch.zeros(1), torch.zeros(1), 9)
    with pytest.raises(ValueError, match="theta must have exactly 1 element"):
        gated_batchquant(x, gate, torch.zeros(2), torch.zeros(1), 4)
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        gated_batchquant(torch.randn(3), torch.ones(3, 1), torch.zeros(1), torch.zeros(1), 4)


def test_opcheck_native_op():
    _require("cpu")
    x, gate, theta, offset = (t.float().requires_grad_() for t in _inputs((4, 6, 3, 3), "channels_last", 9))
    op = torch.ops.bquant.native_gated_batchquant
    for args in [
        (x, gate, theta, offset, None, 4, False),
        (x, gate.detach().view(4, 6, 1, 1).requires_grad_(), theta, offset, torch.tensor([-0.5, 1.5]), 3, True),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_call_has_no_graph_breaks(backend):
    _require(backend)
    x, gate, theta, offset = (t.float() for t in _inputs((4, 6, 3, 3), "contiguous", 4))
    gate, theta, offset = (t.requires_grad_() for t in (gate, theta, offset))

    def fn(x):
        return gated_batchquant(x, gate, theta, offset, 4, backend=backend) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), fn(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    params = (gate, theta, offset)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_ISA_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
import torch
from bquant_kernels import gated_batchquant
outs = []
for x, gate, theta, offset, g in torch.load(sys.argv[1]):
    leaves = [t.clone().requires_grad_() for t in (x, gate, theta, offset)]
    y = gated_batchquant(*leaves, 4, backend="cpu")
    outs += [y.detach(), *torch.autograd.grad(y, leaves, g)]
torch.save(outs, sys.argv[2])
"""


def test_portable_and_avx2_instances_agree(tmp_path):
    """ATEN_CPU_CAPABILITY=default runs the baseline instance of the CPU kernels: the same bits as the
    instance this process runs (AVX2 where the CPU has it)."""
    _require("cpu")
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for layout in ("contiguous", "channels_last"):
            x, gate, theta, offset = _inputs((6, 40, 7, 7), layout, 12)
            x, gate = x.to(dtype), gate.to(dtype)
            cases.append((x, gate, theta.float(), offset.float(), _grad_y(x)))
    h.assert_cpu_instances_agree(_ISA_SCRIPT, cases, tmp_path)
