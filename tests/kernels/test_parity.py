"""Cross-backend parity suite: every backend against the float64 NumPy oracle of the spec.

Runs each (backend, device) pair that is available here; the rest are skipped with the reason
(GPU pairs run on a lent GPU through bench/gpu_check.sh). Forward, grad_x, grad_theta, grad_offset,
the returned range, LSQ and its gradients, all dtypes, both memory formats, odd shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import spec_oracle as oracle
import torch
from helpers import (
    BACKEND_DEVICES,
    allowed_flips,
    assert_quant_close,
    assert_scalar_close,
    make_activation,
    poison_heap,
    require,
    to_layout,
)

import bquant_kernels as bk
from bquant_kernels.backends import get_backend
from bquant_kernels.qparams import SCALE, ZERO, L

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SCALAR_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}
BITS_SIGNED = [(2, False), (3, True), (4, False), (8, False), (4, True)]
# (shape, layout): odd sizes, one channel, one element per channel, 2-D/3-D/4-D, every layout.
CASES = [
    ((6, 5, 7, 9), "contiguous"),
    ((6, 5, 7, 9), "channels_last"),
    ((3, 1, 5, 7), "contiguous"),
    ((1, 7, 1, 1), "channels_last"),
    ((2, 17, 3, 5), "channels_last"),
    ((9, 13), "contiguous"),
    ((4, 6, 11), "contiguous"),
    ((4, 6, 11), "channels_last"),
    ((5, 4, 6, 3), "noncontig"),
    ((3, 6, 5, 5), "sliced"),
]
KINDS = ["mixed", "relu", "shifted"]

backend_devices = pytest.mark.parametrize(
    "backend,device", BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES]
)


def _params(case_index: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Init values (l = 1, o = 0: post-ReLU zeros sit exactly on qmin) for some cases, random for others."""
    if case_index % 3 == 1:
        theta, offset = 0.0, 0.0
    else:
        rng = np.random.default_rng(case_index)
        theta, offset = float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-0.6, 0.6))
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # float64 params for the float64 oracle run
    t = torch.tensor([theta], dtype=pdt, device=device, requires_grad=True)
    o = torch.tensor([offset], dtype=pdt, device=device, requires_grad=True)
    return t, o


def _run(x, theta, offset, bits, signed, backend, g, lo_hi=None):
    poison_heap(x.numel() * x.element_size(), x.device.type)
    y, used = bk.batchquant(x, theta, offset, bits, signed=signed, lo_hi=lo_hi, return_range=True, backend=backend)
    poison_heap(x.numel() * x.element_size(), x.device.type)
    y.backward(g)
    return y, used


def _check(x, g, theta, offset, bits, signed, backend, dtype, lo_hi=None):
    y, used = _run(x, theta, offset, bits, signed, backend, g, lo_hi)
    lo_hi_np = None if lo_hi is None else lo_hi.double().cpu().numpy()
    scale_dtype = None if dtype == torch.float64 else np.float32
    ref = oracle.batchquant(
        x.detach().double().cpu().numpy(),
        g.double().cpu().numpy(),
        float(theta.detach()),
        float(offset.detach()),
        bits,
        signed,
        lo_hi=lo_hi_np,
        scale_dtype=scale_dtype,
    )
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or x.dim() != 4:
        assert y.stride() == torch.empty_like(x).stride(), "y must keep x's memory format"
    step = ref.scale / ref.l
    assert_quant_close(y, ref.y, step, dtype)
    range_rtol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(used.double().cpu().numpy(), [ref.lo, ref.hi], rtol=range_rtol, atol=1e-30)
    gx = x.grad.double().cpu().numpy()
    mismatched = int((gx != ref.grad_x).sum())
    assert mismatched <= allowed_flips(gx.size), f"grad_x: {mismatched} elements differ from the oracle"
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    rtol = SCALAR_RTOL[dtype]
    assert_scalar_close(theta.grad, ref.grad_theta, 1e-2 * ref.grad_theta_scale, rtol, "grad_theta")
    assert_scalar_close(offset.grad, ref.grad_offset, 1e-2 * ref.grad_offset_scale, rtol, "grad_offset")


@backend_devices
@pytest.mark.parametrize("bits,signed", BITS_SIGNED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_batchquant_training_parity(backend, device, bits, signed, dtype, case):
    require(backend, device, dtype)
    shape, layout = CASES[case]
    x64 = make_activation(shape, kind=KINDS[case % 3], seed=case * 31 + bits)
    x = to_layout(x64.to(dtype), layout).to(device).requires_grad_(True)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(case), dtype=torch.float64).to(dtype).to(device)
    theta, offset = _params(case, device, dtype)
    _check(x, g, theta, offset, bits, signed, backend, dtype)


@backend_devices
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [0, 1, 5, 6])
def test_batchquant_eval_parity(backend, device, dtype, case):
    """With a stored range (evaluation) the statistics pass is skipped; values outside it clip."""
    require(backend, device, dtype)
    shape, layout = CASES[case]
    x = to_layout(make_activation(shape, seed=case).to(dtype), layout).to(device).requires_grad_(True)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    theta, offset = _params(case, device, dtype)
    lo_hi = torch.tensor([-0.7, 1.3], device=device)  # narrower than the data: many clipped elements
    _check(x, g, theta, offset, 3, False, backend, dtype, lo_hi=lo_hi)


@backend_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bin_edges_and_ties_exact(backend, device, dtype, layout):
    """Every channel has min -1 and max 2.75, so S = 0.25 and z = 4 exactly (4 bits); x hits every
    bin edge (u = qmin, qmax: inclusive mask) and every half-way tie (round half to even). No
    rounding slack is needed: the result must equal the oracle exactly."""
    require(backend, device, dtype)
    ks = np.arange(-4.0, 11.5, 0.5)  # u - z from qmin - z to qmax - z in half steps
    vals = ks * 0.25  # includes -1.0 and 2.75, the channel min and max
    N, C = 2, 3
    x64 = torch.tensor(np.tile(vals, (N, C, 1))[..., None], dtype=torch.float64)  # (N, C, L, 1)
    x = to_layout(x64.to(dtype, copy=True), layout).to(device).requires_grad_(True)
    g = torch.randn(x64.shape, dtype=torch.float64).to(dtype).to(device)
    theta = torch.zeros(1, device=device, requires_grad=True)
    offset = torch.zeros(1, device=device, requires_grad=True)
    y, used = _run(x, theta, offset, 4, False, backend, g)
    ref = oracle.batchquant(x64.numpy(), g.double().cpu().numpy(), 0.0, 0.0, 4, False)
    assert (ref.scale, ref.zero, ref.l) == (0.25, 4.0, 1.0)
    np.testing.assert_array_equal(y.detach().double().cpu().numpy(), ref.y)
    np.testing.assert_array_equal(x.grad.double().cpu().numpy(), ref.grad_x)
    np.testing.assert_array_equal(used.double().cpu().numpy(), [-1.0, 2.75])
    assert ref.grad_x[0, 0, 0, 0] != 0 and ref.grad_x[0, 0, 1, 0] != 0, "bin edges must be inside (inclusive)"


@backend_devices
def test_16bit_output_is_the_step_multiple(backend, device):
    """For float16/bfloat16 inputs y = (q - z - o) * (S / l), a multiply where the spec divides
    (quant_math.h, batchquant_elem): every backend must give the same 16-bit values. These qparams
    were searched for a level (q = 2) where the two forms round to different float16 values."""
    require(backend, device, torch.float16)
    theta = torch.tensor([1.7340123653411865], device=device)
    offset = torch.zeros(1, device=device)
    lo_hi = torch.tensor([-1.4730387926101685, 0.1711028516292572], device=device)
    reference = get_backend("reference")
    _, qp = reference.batchquant_forward(torch.zeros(1, 1), theta.cpu(), offset.cpu(), lo_hi.cpu(), 4, False, 1, 1)
    S, z, l = qp[SCALE], qp[ZERO], qp[L]
    t = torch.arange(0, 16, dtype=torch.float32) - z  # q - z - o for every level
    by_step, by_division = (t * (S / l)).half(), (t * S / l).half()
    assert not torch.equal(by_step, by_division), "the case must tell the two forms apart"
    x = (t * S / l).half().reshape(1, 1, 16).to(device)  # one element on each level's centre
    y = bk.batchquant(x, theta, offset, 4, lo_hi=lo_hi, backend=backend)
    assert torch.equal(y.cpu().flatten(), by_step)


@backend_devices
@pytest.mark.parametrize("signed", [False, True])
def test_degenerate_all_zero_input(backend, device, signed):
    """All-zero input: S = 1, z = 0 (spec 1.2); signed and unsigned differ only here (spec 1.6)."""
    require(backend, device, torch.float32)
    x = torch.zeros(3, 4, 5, 5, device=device, requires_grad=True)
    g = torch.randn(3, 4, 5, 5, device=device)
    theta = torch.tensor([0.4], device=device, requires_grad=True)
    offset = torch.tensor([-1.3], device=device, requires_grad=True)  # pushes u below 0
    _check(x, g, theta, offset, 2, signed, backend, torch.float32)


@backend_devices
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the Triton interpreter's numpy min
def test_nan_propagates(backend, device):
    require(backend, device, torch.float32)
    x = make_activation((2, 3, 4, 4)).float().to(device)
    x[1, 2, 3, 0] = float("nan")
    t = torch.zeros(1, device=device)
    o = torch.zeros(1, device=device)
    y = bk.batchquant(x, t, o, 4, backend=backend)
    assert torch.isnan(y).all(), "a NaN in x makes the batch range NaN, so all of y"
    assert torch.isnan(bk.batch_range(x, backend=backend)).all()
    y_eval = bk.batchquant(x, t, o, 4, lo_hi=torch.tensor([-1.0, 1.0], device=device), backend=backend)
    assert torch.isnan(y_eval).sum() == 1 and torch.isnan(y_eval[1, 2, 3, 0])


@backend_devices
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_determinism_bitwise(backend, device, dtype):
    require(backend, device, dtype)
    x = make_activation((8, 24, 9, 9), seed=3).to(dtype).to(device)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(device)
    outs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        t = torch.tensor([0.3], device=device, requires_grad=True)
        o = torch.tensor([0.1], device=device, requires_grad=True)
        y = bk.batchquant(xi, t, o, 3, backend=backend)
        y.backward(g)
        outs.append((y, xi.grad, t.grad, o.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@backend_devices
@pytest.mark.parametrize("case", range(len(CASES)))
def test_batch_range_parity(backend, device, case):
    require(backend, device, torch.float32)
    shape, layout = CASES[case]
    x = to_layout(make_activation(shape, seed=case).float(), layout).to(device)
    lo, hi = oracle.channel_range(x.double().cpu().numpy())
    r = bk.batch_range(x, backend=backend)
    assert r.dtype == torch.float32 and r.shape == (2,)
    np.testing.assert_allclose(r.double().cpu().numpy(), [lo, hi], rtol=1e-6)


LSQ_SHAPES = [(24, 16, 1, 1), (48, 1, 7, 7), (10, 37), (3, 5, 3, 3), (7,)]


@backend_devices
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shape", LSQ_SHAPES, ids=str)
def test_lsq_parity(backend, device, dtype, bits, shape):
    require(backend, device, dtype)
    gen = torch.Generator().manual_seed(bits * 7 + len(shape))
    w64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.2
    # a few weights exactly on the grid edges Qn*s, Qp*s (exclusive mask) and on ties
    qn, qp = oracle.lsq_grid(bits)
    s = 0.0625 * (1 if bits > 1 else 2)
    flat = w64.view(-1)
    flat[:3] = torch.tensor([qn * s, qp * s, 0.5 * s], dtype=torch.float64)[: flat.numel()]
    w = w64.to(dtype).to(device).requires_grad_(True)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    step = torch.tensor([-s if bits == 3 else s], dtype=pdt, device=device, requires_grad=True)  # |s| is used
    numel_full = w.numel() * 2  # as for a slice of a larger shared weight
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    poison_heap(w.numel() * w.element_size(), device)
    w_hat = bk.lsq(w, step, bits, numel_full=numel_full, backend=backend)
    poison_heap(w.numel() * w.element_size(), device)
    w_hat.backward(g)
    ref = oracle.lsq(
        w.detach().double().cpu().numpy(), g.double().cpu().numpy(), float(step.detach()), bits, numel_full
    )
    assert w_hat.dtype == dtype and w_hat.shape == w.shape
    assert_quant_close(w_hat, ref.w_hat, s, dtype, "w_hat")
    np.testing.assert_array_equal(w.grad.double().cpu().numpy() != 0, ref.grad_w != 0)
    np.testing.assert_allclose(w.grad.double().cpu().numpy(), ref.grad_w, rtol=0, atol=0)
    assert_scalar_close(step.grad, ref.grad_step, 1e-2 * ref.grad_step_scale, SCALAR_RTOL[dtype], "grad_step")
