"""The CUDA backend (csrc/cuda/) beyond numerical parity (tests/kernels/test_parity.py has the float64 oracle):
every output element written, bitwise determinism, CUDA-graph capture and replay, concurrent
streams, odd sizes and misaligned storage, 64-bit indexing, the launch counts, multi-tensor LSQ.

Here the cuda backend is compared with the reference backend run on the same device and dtype,
at sizes that take many blocks (several row chunks, the last-block finish, vector and scalar paths).
Every GPU test is skipped, with the reason, when no CUDA device or no compiled CUDA kernels are present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import allowed_flips, assert_quant_close, make_activation

import bquant_kernels as bk
from bquant_kernels.backends import get_backend
from bquant_kernels.backends.reference import element_pass
from bquant_kernels.ops import dense_activation
from bquant_kernels.qparams import DL_DTHETA, HI, LO, SCALE, ZERO, L


def _cuda_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine (GPU tests run via bench/gpu_check.sh)"
    ok, why = bk.backends()["cuda"]
    return None if ok else f"cuda backend unavailable: {why}"


_SKIP = _cuda_unavailable()
REF = get_backend("reference")
CUDA = "cuda"  # _forward of the cuda backend: its kernel op (below the autograd op)
NATIVE = torch.ops.bquant
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def gpu_test(fn):
    """Marks a test as needing the CUDA backend; it is skipped with the reason otherwise."""
    return pytest.mark.gpu(pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")(fn))


# ----------------------------------------------------------------------------- inputs


def _place(t: torch.Tensor, layout: str = "contiguous", misalign: int = 0, device: str = "cuda") -> torch.Tensor:
    """``t`` copied to ``device`` in ``layout``, ``misalign`` elements past an aligned address."""
    perm = (0, *range(2, t.dim()), 1) if layout == "channels_last" and t.dim() > 2 else tuple(range(t.dim()))
    buf = torch.empty(t.numel() + misalign, dtype=t.dtype, device=device)
    view = buf[misalign:].view([t.shape[p] for p in perm]).permute(*np.argsort(perm).tolist())
    return view.copy_(t)


def _activation(shape, dtype, layout="contiguous", seed=0, misalign=0, kind="mixed") -> torch.Tensor:
    return _place(make_activation(shape, kind=kind, seed=seed).to(dtype), layout, misalign)


def _leaf_copy(t: torch.Tensor) -> torch.Tensor:
    """A grad-requiring leaf equal to ``t``, with its strides and its storage offset (misalignment)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    buf = torch.zeros(t.storage_offset() + span, dtype=t.dtype, device=t.device)
    leaf = buf.as_strided(t.shape, t.stride(), t.storage_offset())
    return leaf.copy_(t.detach()).requires_grad_(True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _params(theta=0.3, offset=-0.2, dtype=torch.float32):
    return (torch.tensor([theta], dtype=dtype, device="cuda"), torch.tensor([offset], dtype=dtype, device="cuda"))


def _grad_like(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    return torch.empty_like(x).copy_(g)  # the strides of x, as the op layer passes it


def _poison(nbytes: int) -> int:
    """Fill a block of ``nbytes`` with NaN bytes (0xFF is NaN in every float format) and free it.

    The caching allocator serves the next same-size request on this stream from that block; the
    returned address lets the test assert that the output really landed there.
    """
    block = torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda")
    address = block.data_ptr()
    del block
    return address


# ----------------------------------------------------------------------------- comparisons


def _forward(backend, x, theta, offset, bits, signed, lo_hi=None):
    if backend == CUDA:
        return NATIVE.native_batchquant_fwd(x, theta, offset, lo_hi, bits, signed)
    xl, C, inner = dense_activation(x)
    return backend.batchquant_forward(xl, theta, offset, lo_hi, bits, signed, C, inner)


def _assert_forward_matches_reference(x, y, qp, theta, offset, bits, signed, lo_hi=None):
    y_ref, qp_ref = _forward(REF, x, theta, offset, bits, signed, lo_hi)
    got, want = qp.double().cpu(), qp_ref.double().cpu()
    np.testing.assert_allclose(got[[LO, HI]].numpy(), want[[LO, HI]].numpy(), rtol=1e-6, err_msg="lo, hi")
    np.testing.assert_allclose(got[[SCALE, L, DL_DTHETA]].numpy(), want[[SCALE, L, DL_DTHETA]].numpy(), rtol=1e-6)
    assert abs(float(got[ZERO] - want[ZERO])) <= 1.0, "z may differ by one step at most (float32 vs float64 lo)"
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    step = float(want[SCALE] / want[L])
    assert_quant_close(y, y_ref.double().cpu().numpy(), step, x.dtype)


def _grad_scales(g, x, offset, qp, bits, signed) -> tuple[float, float]:
    """Natural scales of grad_theta and grad_offset (sums of |terms|): their rounding error is relative
    to these, not to the (possibly cancelling) sums themselves."""
    y = element_pass(x, offset, qp, bits, signed)[1]
    gd, xd, yd = g.double(), x.double(), y.double()
    l, scale = float(qp[L]), float(qp[SCALE])
    dl_scale = float((gd.abs() * (xd.abs() + yd.abs())).sum()) / l * float(qp[DL_DTHETA])
    return dl_scale, float(gd.abs().sum()) * scale / l


def _assert_scalar_grads_close(got, want, scales, what=("grad_theta", "grad_offset")):
    for a, b, scale, name in zip(got, want, scales, what, strict=True):
        assert abs(float(a) - float(b)) <= 1e-5 * scale + 1e-30, f"{name}: {float(a)!r} vs {float(b)!r}"


def _assert_backward_matches_reference(g, x, offset, qp, bits, signed, grads):
    gx, gt, go = grads
    gx_ref, gt_ref, go_ref = REF.batchquant_backward(g, x, offset, qp, bits, signed)
    assert gx.dtype == x.dtype and gx.stride() == x.stride()
    assert gt.dtype == torch.float32 and go.dtype == torch.float32 and gt.shape == go.shape == (1,)
    mismatched = int((gx != gx_ref).sum())
    assert mismatched <= allowed_flips(x.numel()), f"grad_x: {mismatched} elements differ from the reference"
    _assert_scalar_grads_close((gt, go), (gt_ref, go_ref), _grad_scales(g, x, offset, qp, bits, signed))


def _lsq_step_scale(grad, w, step) -> float:
    return float((grad.double().abs() * (w.double().abs() / abs(float(step)) + 1.0)).sum())


# ----------------------------------------------------------------------------- every element written

# (shape, layout, misalign): both range kernels (planes: inner > 1; rows: inner == 1), vector and
# scalar paths, one channel, one element per channel, sizes not multiple of 4/8, misaligned storage.
SHAPES = [
    ((8, 24, 28, 28), "contiguous", 0),
    ((8, 24, 28, 28), "channels_last", 0),
    ((16, 40, 7, 7), "contiguous", 0),
    ((16, 40, 7, 7), "channels_last", 0),
    ((3, 1, 5, 7), "contiguous", 0),
    ((1, 7), "contiguous", 0),
    ((1, 7, 1, 1), "channels_last", 0),
    ((5, 13, 3), "contiguous", 0),
    ((5, 13, 3), "channels_last", 0),
    ((2, 5, 7, 9), "channels_last", 0),
    ((4, 12, 6, 6), "contiguous", 1),
    ((4, 12, 6, 6), "channels_last", 3),
    ((96, 48, 14, 14), "channels_last", 0),
    ((700, 24), "contiguous", 1),
]


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SHAPES)), ids=[f"{s}-{lay}-off{m}" for s, lay, m in SHAPES])
@pytest.mark.parametrize("stored_range", [False, True], ids=["batch", "stored"])
def test_batchquant_outputs_written_and_match_reference(dtype, case, stored_range):
    shape, layout, misalign = SHAPES[case]
    x = _activation(shape, dtype, layout, seed=case, misalign=misalign, kind=("mixed", "relu", "shifted")[case % 3])
    theta, offset = _params(0.4 - 0.1 * case, 0.05 * case - 0.3)
    bits, signed = (2, 3, 4, 8)[case % 4], case % 2 == 1
    lo_hi = torch.tensor([-0.6, 1.1], device="cuda") if stored_range else None
    nbytes = x.numel() * x.element_size()

    address = _poison(nbytes)
    y, qp = _forward(CUDA, x, theta, offset, bits, signed, lo_hi)
    torch.cuda.synchronize()
    assert y.data_ptr() == address, "y did not reuse the poisoned block: this test would prove nothing"
    assert not torch.isnan(y).any(), "y has unwritten (NaN-poisoned) elements"
    _assert_forward_matches_reference(x, y, qp, theta, offset, bits, signed, lo_hi)

    g = _grad_like(x, seed=case)
    address = _poison(nbytes)
    grads = NATIVE.native_batchquant_bwd(g, x, offset, qp, bits, signed)
    assert grads[0].data_ptr() == address, "grad_x did not reuse the poisoned block"
    assert not torch.isnan(grads[0]).any(), "grad_x has unwritten (NaN-poisoned) elements"
    _assert_backward_matches_reference(g, x, offset, qp, bits, signed, grads)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,misalign", [((24, 16, 1, 1), 0), ((48, 1, 7, 7), 1), ((37,), 3), ((960, 1280), 0)])
def test_lsq_outputs_written_and_match_reference(dtype, shape, misalign):
    w = _place((torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.1).to(dtype), misalign=misalign)
    step = torch.tensor([-0.04], device="cuda")  # |s| is used; sign(s) enters the step gradient
    bits, numel_full = 3, 2 * w.numel()
    address = _poison(w.numel() * w.element_size())
    w_hat = NATIVE.native_lsq_fwd(w, step, bits, True, w.numel())
    assert w_hat.data_ptr() == address and not torch.isnan(w_hat).any()
    torch.testing.assert_close(w_hat, REF.lsq_forward(w, step, bits, True), rtol=0, atol=0)

    g = _grad_like(w)
    address = _poison(w.numel() * w.element_size())
    gw, gs = NATIVE.native_lsq_bwd(g, w, step, bits, True, numel_full)
    assert gw.data_ptr() == address and not torch.isnan(gw).any()
    gw_ref, gs_ref = REF.lsq_backward(g, w, step, bits, True, numel_full)
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=0)
    k = bk.lsq_grad_scale(numel_full, bits)
    assert abs(float(gs) - float(gs_ref)) <= 1e-5 * k * _lsq_step_scale(g, w, step)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_storage_gives_the_aligned_numbers(dtype):
    """The scalar (misaligned) path computes exactly what the vector path does."""
    shape = (6, 16, 10, 10)
    for layout in ("contiguous", "channels_last"):
        aligned = _activation(shape, dtype, layout, seed=5)
        shifted = _activation(shape, dtype, layout, seed=5, misalign=1)
        theta, offset = _params()
        ya, qa = _forward(CUDA, aligned, theta, offset, 4, False)
        ys, qs = _forward(CUDA, shifted, theta, offset, 4, False)
        assert torch.equal(ya, ys) and torch.equal(qa, qs)
        g = _grad_like(aligned)
        gs_ = torch.empty_like(shifted).copy_(g)
        ga, gb = (
            NATIVE.native_batchquant_bwd(g, aligned, offset, qa, 4, False),
            NATIVE.native_batchquant_bwd(gs_, shifted, offset, qs, 4, False),
        )
        assert torch.equal(ga[0], gb[0])
        _assert_scalar_grads_close(ga[1:], gb[1:], _grad_scales(g, aligned, offset, qa, 4, False))


# ----------------------------------------------------------------------------- NaN


@gpu_test
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_propagates_through_the_range(layout):
    x = _activation((4, 32, 9, 9), torch.float32, layout)
    x[3, 17, 8, 2] = float("nan")
    theta, offset = _params()
    y, qp = _forward(CUDA, x, theta, offset, 4, False)
    assert torch.isnan(qp[[LO, HI]]).all() and torch.isnan(y).all()
    y, _ = _forward(CUDA, x, theta, offset, 4, False, lo_hi=torch.tensor([-1.0, 1.0], device="cuda"))
    assert torch.isnan(y).sum() == 1 and torch.isnan(y[3, 17, 8, 2])


# ----------------------------------------------------------------------------- determinism


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(dtype, layout):
    """Two runs through the public op (autograd included) are bitwise equal, scalar gradients too."""
    x0 = _activation((32, 48, 28, 28), dtype, layout, seed=7)
    g = _grad_like(x0, seed=8)
    w0 = torch.randn(512, 576, device="cuda", dtype=dtype) * 0.05
    gw = torch.randn_like(w0)
    runs = []
    for _ in range(2):
        x = x0.clone().requires_grad_(True)
        theta = torch.tensor([0.2], device="cuda", requires_grad=True)
        offset = torch.tensor([0.1], device="cuda", requires_grad=True)
        y = bk.batchquant(x, theta, offset, 3, backend="cuda")
        y.backward(g)
        w = w0.clone().requires_grad_(True)
        step = torch.tensor([0.01], device="cuda", requires_grad=True)
        w_hat = bk.lsq(w, step, 4, backend="cuda")
        w_hat.backward(gw)
        runs.append((y, x.grad, theta.grad, offset.grad, w_hat, w.grad, step.grad))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(_bits(a), _bits(b))


# ----------------------------------------------------------------------------- CUDA graphs


def _graph_workload(x, g, theta, offset, lo_hi, w, gw, step, ws, gws, steps):
    y, qp = _forward(CUDA, x, theta, offset, 4, False)
    gx, gt, go = NATIVE.native_batchquant_bwd(g, x, offset, qp, 4, False)
    y_eval, _ = _forward(CUDA, x, theta, offset, 4, False, lo_hi=lo_hi)
    r = NATIVE.native_batch_range(x)
    w_hat = NATIVE.native_lsq_fwd(w, step, 3, True, w.numel())
    gw_out, gs = NATIVE.native_lsq_bwd(gw, w, step, 3, True, w.numel())
    multi = NATIVE.native_lsq_multi_fwd(ws, steps, [2, 4, 8], True)
    multi_gw, multi_gs = NATIVE.native_lsq_multi_bwd(gws, ws, steps, [2, 4, 8], True, [t.numel() for t in ws])
    return [y, qp, gx, gt, go, y_eval, r, w_hat, gw_out, gs, *multi, *multi_gw, multi_gs]


@gpu_test
def test_cuda_graph_replay_equals_eager():
    """Capture every entry point once; replays on fresh data equal eager runs bitwise (the workspace
    counters are re-zeroed by each replay, so the last-block handshake works every time)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(16, 32, 20, 20, device="cuda")
    g = torch.empty_like(x)
    w = torch.empty(300, 200, device="cuda")
    gw = torch.empty_like(w)
    ws = [torch.empty(64, 32, 3, 3, device="cuda"), torch.empty(999, device="cuda"), torch.empty(96, 24, device="cuda")]
    gws = [torch.empty_like(t) for t in ws]
    theta, offset = _params()
    step = torch.tensor([0.02], device="cuda")
    steps = [torch.tensor([0.01 * (i + 1)], device="cuda") for i in range(len(ws))]
    lo_hi = torch.tensor([-1.0, 2.0], device="cuda")
    static = (x, g, theta, offset, lo_hi, w, gw, step, ws, gws, steps)

    def refill():
        for t in (x, g, w, gw, *ws, *gws):
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen) * 0.5)

    refill()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _graph_workload(*static)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _graph_workload(*static)
    for _ in range(3):
        refill()
        graph.replay()
        eager = _graph_workload(*static)
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(captured, eager, strict=True)):
            assert torch.equal(a, b), f"output {i} of the replayed graph differs from eager"


# ----------------------------------------------------------------------------- streams


@gpu_test
def test_concurrent_streams():
    """Two streams running the kernels at the same time, each with its own workspace, get the
    single-stream results bitwise."""
    inputs = []
    for seed in range(2):
        x = _activation((32, 64, 28, 28), torch.float32, "channels_last" if seed else "contiguous", seed=seed)
        inputs.append((x, _grad_like(x, seed), *_params(0.1 * seed, -0.1 * seed)))

    def work(x, g, theta, offset):
        y, qp = _forward(CUDA, x, theta, offset, 4, False)
        return [y, qp, *NATIVE.native_batchquant_bwd(g, x, offset, qp, 4, False)]

    expected = [work(*inp) for inp in inputs]
    streams = [torch.cuda.Stream() for _ in inputs]
    results: list[list[list[torch.Tensor]]] = [[] for _ in inputs]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(4):
        for k, s in enumerate(streams):
            with torch.cuda.stream(s):
                results[k].append(work(*inputs[k]))
    torch.cuda.synchronize()
    for k in range(len(inputs)):
        for run in results[k]:
            for a, b in zip(run, expected[k], strict=True):
                assert torch.equal(a, b)


# ----------------------------------------------------------------------------- launch counts


def _kernel_launches(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "Memset" not in e.name]


@gpu_test
def test_launch_counts():
    """Forward: 2 kernels (range, element pass), 1 with a stored range; backward: 1; multi-tensor
    LSQ: 1 each way for 100 tensors (plus the workspace counter memsets, not counted)."""
    x = _activation((8, 32, 14, 14), torch.float32)
    theta, offset = _params()
    lo_hi = torch.tensor([-1.0, 1.0], device="cuda")
    try:
        launches = _kernel_launches(lambda: _forward(CUDA, x, theta, offset, 4, False))
    except Exception as err:  # the profiler needs CUPTI
        pytest.skip(f"torch.profiler unavailable: {err}")
    if not launches:
        pytest.skip("torch.profiler recorded no CUDA kernels (no CUPTI activity here)")
    assert len(launches) == 2, launches
    assert len(_kernel_launches(lambda: _forward(CUDA, x, theta, offset, 4, False, lo_hi))) == 1
    _, qp = _forward(CUDA, x, theta, offset, 4, False)
    assert len(_kernel_launches(lambda: NATIVE.native_batchquant_bwd(x, x, offset, qp, 4, False))) == 1
    ws = [torch.randn(17 * (i + 1), device="cuda") for i in range(100)]
    steps = [torch.tensor([0.1], device="cuda") for _ in ws]
    bits = [2 + i % 7 for i in range(100)]
    assert len(_kernel_launches(lambda: NATIVE.native_lsq_multi_fwd(ws, steps, bits, True))) == 1
    full = [t.numel() for t in ws]
    assert len(_kernel_launches(lambda: NATIVE.native_lsq_multi_bwd(ws, ws, steps, bits, True, full))) == 1


# ----------------------------------------------------------------------------- 64-bit indexing


@gpu_test
def test_more_than_2_pow_31_elements():
    shape = (8193, 64, 64, 64)  # 2^31 + 2^18 elements, 4.3 GB in bfloat16
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    theta, offset = _params()
    y, qp = _forward(CUDA, x, theta, offset, 4, False)
    lo_hi_ref = REF.batch_range(x, 64, 64 * 64)
    torch.testing.assert_close(qp[[LO, HI]], lo_hi_ref, rtol=1e-6, atol=0)
    tail = slice(-3, None)  # elements past index 2^31
    y_tail = element_pass(x[tail], offset, qp, 4, False)[1].to(x.dtype)
    assert int((y[tail] != y_tail).sum()) <= allowed_flips(y_tail.numel())
    del y
    gx, gt, go = NATIVE.native_batchquant_bwd(x, x, offset, qp, 4, False)
    inside = element_pass(x[tail], offset, qp, 4, False)[2]
    assert torch.equal(gx[tail], torch.where(inside, x[tail], torch.zeros_like(x[tail])))
    assert torch.isfinite(gt).all() and torch.isfinite(go).all()


# ----------------------------------------------------------------------------- bad input


@gpu_test
def test_bad_input_is_rejected_with_the_argument_name():
    x = _activation((2, 4, 3, 3), torch.float32)
    theta, offset = _params()
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        _forward(CUDA, x.double(), theta, offset, 4, False)
    with pytest.raises(RuntimeError, match="bits must be in"):
        _forward(CUDA, x, theta, offset, 9, False)
    with pytest.raises(RuntimeError, match="theta must have 1 element"):
        _forward(CUDA, x, torch.zeros(2, device="cuda"), offset, 4, False)
    with pytest.raises(RuntimeError, match="theta must be float32, float64, float16 or bfloat16"):
        _forward(CUDA, x, torch.zeros(1, device="cuda", dtype=torch.int32), offset, 4, False)
    y, qp = _forward(CUDA, x, theta, offset, 4, False)
    with pytest.raises(RuntimeError, match="grad_y must have the shape of x"):
        NATIVE.native_batchquant_bwd(y[:, :2], x, offset, qp, 4, False)
    with pytest.raises(RuntimeError, match="qparams must be a contiguous float32 tensor"):
        NATIVE.native_batchquant_bwd(y, x, offset, qp[:4], 4, False)
    with pytest.raises(RuntimeError, match="numel_full must be >= w.numel"):
        NATIVE.native_lsq_bwd(x, x, theta, 4, True, 3)
    with pytest.raises(ValueError, match="share one device and dtype"):
        bk.lsq_multi([x, x.half()], [theta, theta], 4)


# ----------------------------------------------------------------------------- multi-tensor LSQ


def _weights(device: str, dtype: torch.dtype):
    """Weights as a supernet has them: odd shapes, a non-contiguous slice of a larger shared weight,
    misaligned storage, channels_last, a tiny one and one spanning many chunks."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=gen) * 0.1).to(dtype).to(device)

    full = rand(32, 24, 3, 3)
    weights = [
        rand(24, 16, 1, 1),
        rand(48, 1, 7, 7),
        full[:20, :12],
        _place(rand(37, 5), misalign=1, device=device),
        rand(16, 8, 3, 3).contiguous(memory_format=torch.channels_last),
        rand(7),
        rand(1280, 960),
    ]
    numel_full = [w.numel() for w in weights]
    numel_full[2] = full.numel()
    steps = [torch.tensor([(-1) ** i * 0.02 * (i + 1)], device=device) for i in range(len(weights))]
    bits = [2, 3, 4, 8, 1, 5, 4]
    return weights, steps, bits, numel_full


def _run_lsq(weights, steps, bits, numel_full, signed, backend, multi: bool):
    """Forward and backward with fixed upstream gradients; returns (outputs, grad_w, grad_step, tolerances)."""
    ws = [_leaf_copy(w) for w in weights]
    ss = [_leaf_copy(s) for s in steps]
    if multi:
        outs = bk.lsq_multi(ws, ss, bits, signed=signed, numel_full=numel_full, backend=backend)
    else:
        outs = [
            bk.lsq(w, s, b, signed=signed, numel_full=n, backend=backend)
            for w, s, b, n in zip(ws, ss, bits, numel_full, strict=True)
        ]
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device) for o in outs]
    torch.autograd.backward(outs, upstream)
    # The step gradient's rounding error scales with k * sum |g| (|w / s| + 1).
    tols = [
        1e-5 * bk.lsq_grad_scale(n, b, signed) * _lsq_step_scale(g, w, s)
        for g, w, s, b, n in zip(upstream, weights, steps, bits, numel_full, strict=True)
    ]
    return outs, [w.grad for w in ws], [s.grad for s in ss], tols


def _assert_lsq_runs_equal(got, want, weights, exact_step_grad: bool):
    (outs, gws, gss, tols), (outs_ref, gws_ref, gss_ref, _) = got, want
    for o, r, w in zip(outs, outs_ref, weights, strict=True):
        assert o.shape == w.shape and o.dtype == w.dtype and o.stride() == r.stride()
        assert torch.equal(o, r)
    for a, b in zip(gws, gws_ref, strict=True):
        assert torch.equal(a, b)
    for i, (a, b, tol) in enumerate(zip(gss, gss_ref, tols, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype
        if exact_step_grad:
            assert torch.equal(a, b), f"grad of steps[{i}]"
        else:  # another block partition: the fp32 partial sums round differently
            assert abs(float(a) - float(b)) <= tol, f"grad of steps[{i}]: {float(a)!r} vs {float(b)!r}"


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_multi_equals_per_tensor_op(dtype, signed):
    weights, steps, bits, numel_full = _weights("cuda", dtype)
    got = _run_lsq(weights, steps, bits, numel_full, signed, "cuda", multi=True)
    want = _run_lsq(weights, steps, bits, numel_full, signed, "cuda", multi=False)
    _assert_lsq_runs_equal(got, want, weights, exact_step_grad=False)


@gpu_test
def test_lsq_multi_more_tensors_than_one_launch_holds():
    weights = [torch.randn(3 + i, device="cuda") * 0.1 for i in range(300)]
    steps = [torch.tensor([0.01 + 0.001 * i], device="cuda") for i in range(300)]
    bits = [1 + i % 8 for i in range(300)]
    full = [w.numel() for w in weights]
    got = _run_lsq(weights, steps, bits, full, True, "cuda", multi=True)
    want = _run_lsq(weights, steps, bits, full, True, "cuda", multi=False)
    _assert_lsq_runs_equal(got, want, weights, exact_step_grad=False)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_lsq_multi_is_the_per_tensor_loop_elsewhere(backend):
    """On the other backends lsq_multi is a loop over lsq: the same numbers, bit for bit."""
    ok, why = bk.backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    weights, steps, bits, numel_full = _weights("cpu", torch.float32)
    got = _run_lsq(weights, steps, bits, numel_full, True, backend, multi=True)
    want = _run_lsq(weights, steps, bits, numel_full, True, backend, multi=False)
    _assert_lsq_runs_equal(got, want, weights, exact_step_grad=True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_lsq_multi_step_grads_keep_the_step_shape_and_dtype(device):
    """A 0-d step and a float64 step get gradients of their own shape and dtype, equal to the per-tensor op's."""
    if device == "cuda" and _SKIP is not None:
        pytest.skip(_SKIP)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(5, 3, generator=gen).to(device), torch.randn(7, generator=gen).to(device)]
    steps = [torch.tensor(0.1, device=device), torch.tensor([0.2], dtype=torch.float64, device=device)]
    grads = []
    for multi in (True, False):
        ws = [w.clone().requires_grad_() for w in weights]
        ss = [s.clone().requires_grad_() for s in steps]
        outs = (
            bk.lsq_multi(ws, ss, [3, 4]) if multi else [bk.lsq(w, s, b) for w, s, b in zip(ws, ss, [3, 4], strict=True)]
        )
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        grads.append([s.grad for s in ss] + [w.grad for w in ws])
    for got, want in zip(*grads, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_lsq_multi_with_unused_outputs(device):
    """Outputs that do not reach the loss get zero gradients for their weight and step, the others
    the per-tensor op's; an unused BatchQuant range needs no gradient either."""
    if device == "cuda" and _SKIP is not None:
        pytest.skip(_SKIP)
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(6, 4, generator=gen).to(device) for _ in range(3)]
    ws = [w.clone().requires_grad_() for w in weights]
    ss = [torch.tensor([0.3], device=device, requires_grad=True) for _ in weights]
    outs = bk.lsq_multi(ws, ss, [2, 3, 4])
    (outs[1] * torch.arange(24.0, device=device).view(6, 4)).sum().backward()
    for i in (0, 2):
        assert torch.equal(ws[i].grad, torch.zeros_like(weights[i])) and float(ss[i].grad) == 0.0
    w1, s1 = weights[1].clone().requires_grad_(), torch.tensor([0.3], device=device, requires_grad=True)
    (bk.lsq(w1, s1, 3) * torch.arange(24.0, device=device).view(6, 4)).sum().backward()
    assert torch.equal(ws[1].grad, w1.grad) and torch.equal(ss[1].grad, s1.grad)
    x = torch.randn(4, 3, 5, generator=gen).to(device).requires_grad_()
    theta, offset = (torch.zeros(1, device=device, requires_grad=True) for _ in range(2))
    y, lo_hi = bk.batchquant(x, theta, offset, 4, return_range=True)
    (y.sum() + lo_hi.sum()).backward()
    assert x.grad is not None and theta.grad is not None and offset.grad is not None


def test_lsq_multi_rejects_mismatched_lists():
    w = [torch.randn(4), torch.randn(5)]
    s = [torch.ones(1), torch.ones(1)]
    with pytest.raises(ValueError, match="steps must have one entry per weight"):
        bk.lsq_multi(w, s[:1], 4)
    with pytest.raises(ValueError, match="bits must be an int or have one entry per weight"):
        bk.lsq_multi(w, s, [4])
    with pytest.raises(ValueError, match=r"numel_full\[1\] must be an int >= weights\[1\].numel\(\)"):
        bk.lsq_multi(w, s, 4, numel_full=[4, 2])
    with pytest.raises(ValueError, match=r"bits\[0\] must be in \[1, 8\]"):
        bk.lsq_multi(w, s, [0, 4])
    assert bk.lsq_multi([], [], 4) == []
