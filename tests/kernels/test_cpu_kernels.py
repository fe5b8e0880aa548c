"""Tests specific to the fused CPU backend (csrc/cpu); cross-backend parity is tests/kernels/test_parity.py.

Determinism across thread counts (bitwise), work-chunk and vector tails, NaN propagation, float64
exactness against the reference, channels_last vs contiguous, the portable vs the AVX2 kernels, and
input checks. The tests call the kernel ops directly (``torch.ops.bquant.native_*_fwd``/``_bwd``, the
layer below ``bquant_kernels.ops`` and the native autograd op).

Element outputs are compared bitwise with the reference backend's element pass run on the qparams
the kernel returned: the kernel must evaluate the spec's float32 (float64) operations in the same
order, whatever vector lane or scalar tail an element falls in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_activation, poison_heap, require

from bquant_kernels.backends import get_backend
from bquant_kernels.ops import dense_activation
from bquant_kernels.qparams import DL_DTHETA, HI, LO, SCALE, L, batchquant_grid

CHUNK = 8192  # kChunk of csrc/cpu/cpu_common.h: the fixed work unit of every parallel pass
PARALLEL_MIN = 32768  # kMinParallelElems: smaller calls run on one thread
# Statistics modes of csrc/cpu/batchquant_cpu.cpp: "row mode" when inner >= 16 and C * inner > 4096,
# else "column mode" over (outer, C * inner), in groups of max(16, 65536 // (C * inner)) rows and
# column blocks of 512.
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}

ref = get_backend("reference")
native = torch.ops.bquant


@pytest.fixture(autouse=True)
def _cpu_backend():
    require("cpu", "cpu")


# ----------------------------------------------------------------------------- helpers


def _channels_last(t):
    """Channels innermost in memory: channels_last for 4-D, (N, L, C) memory for 3-D."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.transpose(1, -1).contiguous().transpose(1, -1)


def _activation(shape, dtype, seed=0, kind="mixed", channels_last=False):
    x = make_activation(shape, kind=kind, seed=seed).to(dtype)
    return _channels_last(x) if channels_last else x


def _randn_like(x, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).as_strided(x.shape, x.stride())


def _params(theta=0.3, offset=0.2):
    return torch.tensor([theta]), torch.tensor([offset])


def _batchquant(x, g, theta, offset, bits=4, signed=False, lo_hi=None):
    """The CPU kernels on x (already dense): (y, qparams, grad_x, grad_theta, grad_offset)."""
    assert dense_activation(x)[0] is x, "tests pass dense tensors"
    poison_heap(x.numel() * x.element_size(), "cpu")
    y, qp = native.native_batchquant_fwd(x, theta, offset, lo_hi, bits, signed)
    poison_heap(x.numel() * x.element_size(), "cpu")
    gx, gt, go = native.native_batchquant_bwd(g.as_strided(x.shape, x.stride()), x, offset, qp, bits, signed)
    return y, qp, gx, gt, go


def _lsq(w, g, step, bits=4, signed=True, numel_full=None):
    numel_full = w.numel() if numel_full is None else numel_full
    poison_heap(w.numel() * w.element_size(), "cpu")
    out = native.native_lsq_fwd(w, step, bits, signed, numel_full)
    gw, gs = native.native_lsq_bwd(g, w, step, bits, signed, numel_full)
    return out, gw, gs


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    ai = a.contiguous().view(INT_VIEW[a.dtype])
    bi = b.contiguous().view(INT_VIEW[b.dtype])
    nan_both = torch.isnan(a.contiguous()) & torch.isnan(b.contiguous())  # NaN payloads may differ
    bad = (ai != bi) & ~nan_both
    assert not bad.any(), f"{what}: {int(bad.sum())} of {a.numel()} elements differ, e.g. {a[bad][:4]} vs {b[bad][:4]}"


def expected_range(x):
    """(lo, hi) as the kernel defines them: exact per-channel min/max, summed in double in channel order."""
    dims = [d for d in range(x.dim()) if d != 1]
    lo = hi = 0.0
    for m, M in zip(torch.amin(x, dim=dims).double().tolist(), torch.amax(x, dim=dims).double().tolist(), strict=True):
        lo += m
        hi += M
    return lo / x.shape[1], hi / x.shape[1]


def check_against_reference(x, g, offset, bits, signed, y, qp, gx, gt, go):
    """Element outputs bitwise equal to the reference element pass on the kernel's qparams; scalar
    gradients close to the reference's double sums, relative to the sum of |terms| (the kernel adds
    float32 terms in float32 within a chunk, float64 ones in float64)."""
    scalar_rtol = 1e-13 if qp.dtype == torch.float64 else 2e-5
    xf, y_ref, inside = ref.element_pass(x, offset, qp, bits, signed)
    assert_bitwise(y, y_ref.to(x.dtype), "y")
    gx_ref, gt_ref, go_ref = ref.batchquant_backward(g, x, offset, qp, bits, signed)
    assert_bitwise(gx, gx_ref, "grad_x")
    gf = g.to(qp.dtype)
    l, scale, dl = qp[L].double(), qp[SCALE].double(), qp[DL_DTHETA].double()
    dl_terms = (gf * torch.where(inside, xf - y_ref, -y_ref)).double()
    theta_scale = float(dl_terms.abs().sum() / l * dl)
    offset_scale = float((gf * ~inside).double().abs().sum() * scale / l)
    checks = ((gt, gt_ref, theta_scale, "grad_theta"), (go, go_ref, offset_scale, "grad_offset"))
    for got, want, s, what in checks:
        assert got.dtype == qp.dtype and got.shape == (1,), f"{what}: {got.dtype}{tuple(got.shape)}"
        diff = abs(float(got) - float(want))
        assert diff <= scalar_rtol * max(s, 1e-30), f"{what}: {float(got)!r} vs {float(want)!r} (scale {s:.3g})"


def run_both_thread_counts(fn):
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(fn())
        return outs
    finally:
        torch.set_num_threads(prev)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((6, 10, 23, 29), False),  # row mode; 40020 elements: 4 full chunks and a ragged one
        ((6, 10, 23, 29), True),  # column mode, one row group
        ((3000, 60), False),  # column mode, three row groups
        ((150, 1108), False),  # column mode, three row groups, three column blocks
    ],
    ids=["row-mode", "channels_last", "column-groups", "column-blocks"],
)
def test_thread_count_determinism_bitwise(dtype, shape, channels_last):
    x = _activation(shape, dtype, seed=1, channels_last=channels_last)
    g = _randn_like(x, 2)
    w = torch.randn(5 * CHUNK + 13, generator=torch.Generator().manual_seed(3)).to(dtype)
    gw = torch.randn(w.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    theta, offset = _params()

    def run():
        return (*_batchquant(x, g, theta, offset, bits=3), *_lsq(w, gw, torch.tensor([0.21]), bits=3))

    names = ("y", "qparams", "grad_x", "grad_theta", "grad_offset", "w_hat", "grad_w", "grad_step")
    one, two = run_both_thread_counts(run)
    for a, b, name in zip(one, two, names, strict=True):
        assert_bitwise(a, b, f"{name}, 1 vs 2 threads")
    assert x.numel() > PARALLEL_MIN and w.numel() > PARALLEL_MIN


# ----------------------------------------------------------------------------- tails and layouts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, CHUNK - 1),  # one row shorter than a chunk
        (1, 1, 2 * CHUNK + 1),  # a row cut into segments, ragged last segment
        (3, 2, 5 * CHUNK + 17),  # segmented rows, parallel
        (CHUNK + 3, 1),  # column mode, one column
        (150, 1108),  # column mode: ragged row group and column block
        (7000, 7, 3),  # column mode, inner 3: parallel, ragged row group
    ],
    ids=str,
)
def test_chunk_tails_match_reference(dtype, shape):
    x = _activation(shape, dtype, seed=5, kind="shifted")
    g = _randn_like(x, 6)
    theta, offset = _params(-0.4, 0.35)
    y, qp, gx, gt, go = _batchquant(x, g, theta, offset, bits=5, signed=True)
    lo, hi = expected_range(x)
    assert_bitwise(qp[LO : HI + 1], torch.tensor([lo, hi], dtype=qp.dtype), "qparams lo, hi")
    check_against_reference(x, g, offset, 5, True, y, qp, gx, gt, go)
    w = x.reshape(-1)
    out, gw, gs = _lsq(w, g.reshape(-1), torch.tensor([-0.13]), bits=4)
    assert_bitwise(out, ref.lsq_forward(w, torch.tensor([-0.13]), 4, True), "w_hat")
    gw_ref, gs_ref = ref.lsq_backward(g.reshape(-1), w, torch.tensor([-0.13]), 4, True, w.numel())
    assert_bitwise(gw, gw_ref, "grad_w")
    torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_channel", range(1, 18))
def test_vector_tail_sizes(dtype, per_channel):
    """Every split between vector body and tail (vectors hold 4 to 16 elements) in both statistics
    modes (row mode: rows of 16..32; column mode: 1..17 columns), and in the element passes."""
    theta, offset = _params(0.7, -0.3)
    for x in (
        _activation((3, 5, per_channel), dtype, seed=per_channel),  # column mode, inner = per_channel
        _activation((2, 260, 15 + per_channel), dtype, seed=per_channel + 20),  # row mode
        _activation((2, per_channel, 3, 2), dtype, seed=per_channel + 50, channels_last=True),  # per_channel columns
        _activation((2, per_channel), dtype, seed=per_channel + 100),  # 2-D: per_channel columns
    ):
        g = _randn_like(x, per_channel)
        y, qp, gx, gt, go = _batchquant(x, g, theta, offset, bits=4)
        lo, hi = expected_range(x)
        assert_bitwise(qp[LO : HI + 1], torch.tensor([lo, hi], dtype=qp.dtype), "qparams lo, hi")
        rng = native.native_batch_range(x)
        assert_bitwise(rng, torch.tensor([lo, hi], dtype=torch.float32), "batch_range")
        check_against_reference(x, g, offset, 4, False, y, qp, gx, gt, go)
        w = x.reshape(-1)
        out, gw, _ = _lsq(w, g.reshape(-1), torch.tensor([0.4]), bits=3)
        assert_bitwise(out, ref.lsq_forward(w, torch.tensor([0.4]), 3, True), "w_hat")
        assert_bitwise(gw, ref.lsq_backward(g.reshape(-1), w, torch.tensor([0.4]), 3, True, w.numel())[0], "grad_w")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_matches_contiguous(dtype):
    theta, offset = _params()
    for shape in ((5, 12, 9, 11), (7, 20, 33)):
        x = _activation(shape, dtype, seed=7)
        x_cl = _channels_last(x)
        assert dense_activation(x)[2] > 1 and dense_activation(x_cl)[2] == 1
        g = _randn_like(x, 8)
        a = _batchquant(x, g, theta, offset)
        b = _batchquant(x_cl, _channels_last(g), theta, offset)
        for u, v, name in zip(a[:3], b[:3], ("y", "qparams", "grad_x"), strict=True):
            assert_bitwise(u, v, f"{name}, contiguous vs channels_last")
        assert b[0].stride() == x_cl.stride() and b[2].stride() == x_cl.stride(), "outputs keep x's memory format"
        # The scalar sums run in memory order, so the two layouts add the same terms in another order.
        for u, v in zip(a[3:], b[3:], strict=True):
            torch.testing.assert_close(u, v, rtol=2e-5 if dtype != torch.float64 else 1e-13, atol=1e-6)


def test_ties_round_half_even_and_inclusive_mask():
    """u exactly on k + 0.5 rounds to even, and u exactly on qmin / qmax is inside, in body and tail."""
    qmin, qmax = batchquant_grid(4, False)
    scale = 0.25  # lo_hi = [0, 3.75] gives S = 0.25, z = 0; theta = 0 gives l = 1: u = 4 x exactly
    k = torch.arange(-2, 17, dtype=torch.float32)
    u = torch.cat([k + 0.5, torch.tensor([qmin, qmax])])
    x = (u * scale).repeat(3).reshape(1, 1, -1)  # 63 elements: 7 vectors and a tail of 7
    g = _randn_like(x, 9)
    theta, offset = _params(0.0, 0.0)
    lo_hi = torch.tensor([0.0, 99.0, 3.75])[::2]  # a strided view: read in place
    y, qp, gx, *_ = _batchquant(x, g, theta, offset, bits=4, lo_hi=lo_hi)
    assert float(qp[SCALE]) == scale and float(qp[L]) == 1.0
    q = torch.round(torch.clamp(x.reshape(-1) / scale, qmin, qmax))
    assert_bitwise(y.reshape(-1), q * scale, "y on ties")
    uu = x.reshape(-1) / scale
    assert_bitwise(gx.reshape(-1), torch.where((uu >= qmin) & (uu <= qmax), g.reshape(-1), 0.0), "grad_x mask")


# ----------------------------------------------------------------------------- NaN


@pytest.mark.parametrize(
    "shape,channels_last",
    [((2, 300, 40), False), ((3, 4, 5), False), ((5, 6, 3, 3), True), ((3, 2, 2 * CHUNK + 5), False)],
    ids=["row-mode", "column-mode", "channels_last", "segmented"],
)
@pytest.mark.parametrize("where", ["first", "body", "tail", "last"])
def test_nan_propagates(shape, channels_last, where):
    x = _activation(shape, torch.float32, seed=11, channels_last=channels_last)
    flat = x.permute(*_memory_order(x)).reshape(-1)  # a view in memory order
    n = flat.numel()
    flat[{"first": 0, "body": n // 2 - 3, "tail": n - 2, "last": n - 1}[where]] = float("nan")
    g = _randn_like(x, 12)
    theta, offset = _params()

    rng = native.native_batch_range(x)
    assert torch.isnan(rng).all(), "a NaN anywhere makes lo and hi NaN (like torch.amin / amax)"
    y, qp, gx, gt, go = _batchquant(x, g, theta, offset)
    assert torch.isnan(qp[LO : HI + 1]).all() and torch.isnan(y).all()

    lo_hi = torch.tensor([-1.0, 2.0])
    y, qp, gx, gt, go = _batchquant(x, g, theta, offset, lo_hi=lo_hi)
    assert torch.equal(torch.isnan(y), torch.isnan(x)), "with lo_hi only the NaN element is NaN"
    _, y_ref, _ = ref.element_pass(x, offset, qp, 4, False)
    assert_bitwise(y, y_ref, "y with lo_hi")
    gx_ref, gt_ref, go_ref = ref.batchquant_backward(g.as_strided(x.shape, x.stride()), x, offset, qp, 4, False)
    assert_bitwise(gx, gx_ref, "grad_x")
    assert torch.isnan(gt) and torch.isnan(gt_ref), "the NaN element's dl term is NaN"
    torch.testing.assert_close(go, go_ref, rtol=1e-5, atol=1e-6)  # a NaN element counts as outside

    w = x.reshape(-1) if x.is_contiguous() else flat.clone()
    out, gw, gs = _lsq(w, torch.ones_like(w), torch.tensor([0.3]))
    assert torch.equal(torch.isnan(out), torch.isnan(w)) and torch.isnan(gs)
    assert_bitwise(gw, ref.lsq_backward(torch.ones_like(w), w, torch.tensor([0.3]), 4, True, w.numel())[0], "grad_w")


# c10's NaN in each 16-bit type, by the NaN's sign (bfloat16 drops it).
C10_NAN_BITS = {torch.bfloat16: (0x7FC0, 0x7FC0), torch.float16: (0x7E00, 0xFE00 - 0x10000)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_nan_stored_as_c10_stores_it_wherever_it_sits(dtype):
    """A NaN output element has c10's bits (the scalar tail's) whether it sits in a vector body or in the
    tail: torch's vector conversions would store 0xFFFF (bfloat16) or keep the payload (float16). NaN of
    both signs and with payloads, in y (stored range), grad_x (NaN gradients passed through), and w_hat."""
    x = _activation((3, 5, 7), torch.float32, seed=13).to(dtype)  # 105 elements: vector blocks and a tail
    g = _randn_like(x, 14)
    payload = {torch.bfloat16: (0x7FC1, -0x0041), torch.float16: (0x7E01, -0x01FF)}[dtype]  # +NaN, -NaN
    for i, bits in zip((2, 20, 100, 103), payload * 2, strict=True):  # body, body, tail, tail
        x.view(-1)[i] = torch.tensor(bits, dtype=torch.int16).view(dtype)
        g.view(-1)[i + 1] = torch.tensor(bits, dtype=torch.int16).view(dtype)
        x.view(-1)[i + 1] = 0.5  # inside the range: its gradient is g's NaN
    theta, offset = _params()
    y, _, gx, _, _ = _batchquant(x, g, theta, offset, lo_hi=torch.tensor([-3.0, 3.0]))
    w_hat, _, _ = _lsq(x.reshape(-1), g.reshape(-1), torch.tensor([0.3]))
    for name, t in (("y", y), ("grad_x", gx), ("w_hat", w_hat)):
        nan = torch.isnan(t)
        assert nan.sum() == 4, f"{name}: {int(nan.sum())} NaN"
        bits = t.contiguous().view(torch.int16)[nan]
        want = torch.tensor([C10_NAN_BITS[dtype][int(b < 0)] for b in bits.tolist()], dtype=torch.int16)
        assert torch.equal(bits, want), f"{name}: NaN bits {bits.tolist()}, c10 stores {want.tolist()}"


def _memory_order(x):
    """The permutation of x's dims that is contiguous in memory (outermost first)."""
    return sorted(range(x.dim()), key=lambda d: -x.stride(d))


# ----------------------------------------------------------------------------- float64


@pytest.mark.parametrize("kind", ["mixed", "relu", "shifted"])
@pytest.mark.parametrize("shape,channels_last", [((4, 9, 13, 11), False), ((4, 9, 13, 11), True), ((33, 70), False)])
def test_float64_matches_reference(kind, shape, channels_last):
    x = _activation(shape, torch.float64, seed=13, kind=kind, channels_last=channels_last)
    g = _randn_like(x, 14)
    theta = torch.tensor([0.45], dtype=torch.float64)
    offset = torch.tensor([-0.27], dtype=torch.float64)
    y, qp, gx, gt, go = _batchquant(x, g, theta, offset, bits=6)
    _, C, inner = dense_activation(x)
    y_ref, qp_ref = ref.batchquant_forward(x, theta, offset, None, 6, False, C, inner)
    assert qp.dtype == torch.float64
    torch.testing.assert_close(qp, qp_ref, rtol=1e-13, atol=0.0)  # lo/hi: channel sums in another order
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12 * float(qp[SCALE]))
    gx_ref, gt_ref, go_ref = ref.batchquant_backward(g, x, offset, qp_ref, 6, False)
    assert_bitwise(gx, gx_ref, "grad_x")
    torch.testing.assert_close(gt, gt_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(go, go_ref, rtol=1e-12, atol=1e-12)
    check_against_reference(x, g, offset, 6, False, y, qp, gx, gt, go)

    w = x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)
    step = torch.tensor([0.093], dtype=torch.float64)
    out, gw, gs = _lsq(w, g.contiguous().reshape(-1), step, bits=5, numel_full=3 * w.numel())
    gw_ref, gs_ref = ref.lsq_backward(g.contiguous().reshape(-1), w, step, 5, True, 3 * w.numel())
    assert_bitwise(out, ref.lsq_forward(w, step, 5, True), "w_hat")
    assert_bitwise(gw, gw_ref, "grad_w")
    torch.testing.assert_close(gs, gs_ref, rtol=1e-12, atol=0.0)


# ----------------------------------------------------------------------------- instruction sets

# Runs the kernels on fixed inputs; `outputs()` is called here and in a subprocess.
_ISA_CODE = textwrap.dedent(
    """
    import torch

    import bquant_kernels  # noqa: F401  (loads the extension, which registers torch.ops.bquant)

    def outputs():
        native = torch.ops.bquant
        out = []
        cases = [((7, 9, 11, 13), False), ((7, 9, 11, 13), True), ((45, 301), False), ((2, 300, 21), False)]
        for i, dtype in enumerate([torch.float32, torch.float64, torch.float16, torch.bfloat16]):
            gen = torch.Generator().manual_seed(i)
            for shape, cl in cases:
                x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.3).to(dtype)
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).as_strided(x.shape, x.stride())
                th, of = torch.tensor([0.6]), torch.tensor([0.15])
                y, qp = native.native_batchquant_fwd(x, th, of, None, 3, True)
                out += [native.native_batch_range(x), y, qp, *native.native_batchquant_bwd(g, x, of, qp, 3, True)]
                w, gw = x.contiguous(), g.contiguous()
                out += [native.native_lsq_fwd(w, th, 4, True, w.numel())]
                out += native.native_lsq_bwd(gw, w, th, 4, True, 2 * w.numel())
        return out
    """
)


def test_portable_and_avx2_kernels_agree(tmp_path):
    """ATEN_CPU_CAPABILITY=default selects the portable kernels; they must give the same bits as the
    kernels this process picked (AVX2 where the CPU has it): both use 8-lane float accumulators."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    path = tmp_path / "portable.pt"
    script = _ISA_CODE + "\nimport sys\ntorch.save(outputs(), sys.argv[1])\n"
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    portable = torch.load(path)
    namespace: dict = {}
    exec(_ISA_CODE, namespace)
    native = namespace["outputs"]()
    assert len(portable) == len(native)
    for i, (a, b) in enumerate(zip(portable, native, strict=True)):
        assert_bitwise(a, b, f"output {i}, portable vs native kernels")


# ----------------------------------------------------------------------------- input checks


def test_invalid_inputs_raise_clear_errors():
    """The C++ checks of the kernel ops, for callers of torch.ops.bquant that bypass bquant_kernels.checks
    (the layout arguments C and inner of the kernels are computed by the op, so they cannot be wrong)."""
    x = _activation((2, 3, 4, 5), torch.float32)
    t, o = _params()
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        native.native_batchquant_fwd(x.int(), t, o, None, 4, False)
    with pytest.raises(RuntimeError, match="x must have at least 2 dimensions"):
        native.native_batch_range(x.reshape(-1))
    with pytest.raises(RuntimeError, match="theta must have 1 element"):
        native.native_batchquant_fwd(x, torch.zeros(2), o, None, 4, False)
    with pytest.raises(RuntimeError, match="lo_hi must have 2 element"):
        native.native_batchquant_fwd(x, t, o, torch.zeros(3), 4, False)
    with pytest.raises(RuntimeError, match="bits must be in"):
        native.native_batchquant_fwd(x, t, o, None, 0, False)
    _, qp = native.native_batchquant_fwd(x, t, o, None, 4, False)
    with pytest.raises(RuntimeError, match="grad_y must have the dtype of x"):
        native.native_batchquant_bwd(x.double(), x, o, qp, 4, False)
    with pytest.raises(RuntimeError, match="qparams must be Float"):
        native.native_batchquant_bwd(x, x, o, qp.double(), 4, False)
    with pytest.raises(RuntimeError, match="qparams must have 6 element"):
        native.native_batchquant_bwd(x, x, o, qp[:5], 4, False)
    with pytest.raises(RuntimeError, match="numel_full must be >= w.numel"):
        native.native_lsq_bwd(x, x, t, 4, True, x.numel() - 1)
    with pytest.raises(RuntimeError, match="step must have 1 element"):
        native.native_lsq_fwd(x, torch.ones(2), 4, True, x.numel())
    with pytest.raises(RuntimeError, match="w must not be empty"):
        native.native_lsq_fwd(torch.empty(0), t, 4, True, 0)
