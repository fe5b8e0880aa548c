"""Triton backend specifics: rounding and dtype-conversion helpers (bitwise), the float64 scalar
path, multi-program grids against the reference backend, determinism, poisoned outputs, backend
selection, and ``torch.compile(fullgraph=True)`` over the ops.

On a CPU-only machine these run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before triton is imported); on a GPU they run compiled. Cross-backend parity against
the float64 spec oracle is tests/kernels/test_parity.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

import bquant_kernels as bk  # noqa: E402
from bquant_kernels.backends import reference  # noqa: E402
from bquant_kernels.backends import triton as triton_backend  # noqa: E402
from bquant_kernels.backends.triton import batchquant as tbq  # noqa: E402
from bquant_kernels.backends.triton import launch  # noqa: E402
from bquant_kernels.backends.triton.rounding import cast_rne, round_half_even, round_half_even_portable  # noqa: E402
from bquant_kernels.qparams import DL_DTHETA, HI, LO, SCALE, ZERO, L  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The interpreter runs kernels in NumPy, which warns on the inf/NaN the tests feed in on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture
def device() -> str:
    ok, why = triton_backend.available()
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    return "cpu" if launch.INTERPRET else "cuda"


@pytest.fixture
def many_programs(monkeypatch):
    """Make the reduction grids large for small tensors: many splits (most of them empty), several
    channel blocks and multi-iteration grid-stride loops, so the partial/finish logic is exercised."""

    def use(n: int) -> None:
        monkeypatch.setattr(launch, "target_programs", lambda device: n)

    return use


# ----------------------------------------------------------------------------- helpers in kernels


@triton.jit
def _round_kernel(x_ptr, used_ptr, portable_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask)
    tl.store(used_ptr + offs, round_half_even(v), mask=mask)
    tl.store(portable_ptr + offs, round_half_even_portable(v), mask=mask)


@triton.jit
def _finish_range_kernel(part_ptr, out_ptr, n_splits, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    tbq.finish_range(part_ptr, out_ptr, out_ptr, n_splits, C, 0.0, 0.0, False, BLOCK_S, BLOCK_C)


@triton.jit
def _cast_kernel(x_ptr, bf16_ptr, fp16_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask)
    tl.store(bf16_ptr + offs, cast_rne(v, bf16_ptr.dtype.element_ty), mask=mask)
    tl.store(fp16_ptr + offs, cast_rne(v, fp16_ptr.dtype.element_ty), mask=mask)


def _bits(t: torch.Tensor) -> np.ndarray:
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[t.element_size()]
    return t.cpu().contiguous().view(torch.uint8).numpy().view(ints)


def _assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same bits everywhere, except that any NaN matches any NaN (payloads are not specified)."""
    g_nan, w_nan = torch.isnan(got.float()).cpu().numpy(), torch.isnan(want.float()).cpu().numpy()
    np.testing.assert_array_equal(g_nan, w_nan, err_msg=f"{what}: NaN positions differ")
    diff = (_bits(got) != _bits(want)) & ~w_nan
    assert not diff.any(), (
        f"{what}: {diff.sum()} of {diff.size} differ, e.g. inputs at {np.flatnonzero(diff)[:5]}: "
        f"got {got.cpu().numpy()[diff][:5]} want {want.cpu().numpy()[diff][:5]}"
    )


def _rounding_inputs(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    mant_bits = 23 if dtype == torch.float32 else 52
    big = float(2**mant_bits)
    finfo = torch.finfo(dtype)
    half = torch.tensor(0.5, dtype=dtype)
    specials = [
        0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.3, -0.3, -0.7, 1.0, -1.0,
        big - 0.5, big - 1.5, big + 1, big + 2, -(big + 1), 2 * big + 2, 3 * big, finfo.max, -finfo.max,
        finfo.tiny, -finfo.tiny, finfo.tiny * finfo.eps, math.inf, -math.inf, math.nan,
    ]  # fmt: skip
    near_half = torch.stack(
        [torch.nextafter(half + k, half + k + s) for k in (0.0, 1.0, 2.0, -1.0, -3.0) for s in (-1.0, 1.0)]
    )
    ties = torch.randint(-(2**20), 2**20, (8000,), generator=gen).to(dtype) + 0.5
    small_ties = torch.arange(-64, 64, dtype=dtype) + 0.5
    wide = torch.randn(12000, generator=gen, dtype=dtype) * torch.pow(10.0, torch.empty(12000).uniform_(-3, 9)).to(
        dtype
    )
    return torch.cat([torch.tensor(specials, dtype=dtype), near_half, ties, small_ties, wide])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_round_half_even_matches_torch_round(device, dtype):
    """Both the helper the kernels use (rint on a GPU) and the portable floor-based one equal
    torch.round bit for bit: ties to even, signed zeros, huge values, inf and NaN."""
    x = _rounding_inputs(dtype).to(device)
    used, portable = torch.empty_like(x), torch.empty_like(x)
    n, block = x.numel(), 4096
    _round_kernel[(triton.cdiv(n, block),)](x, used, portable, n, BLOCK=block)
    want = torch.round(x)
    _assert_bitwise(portable, want, "round_half_even_portable")
    _assert_bitwise(used, want, "round_half_even")


def test_cast_rne_matches_torch(device):
    """float32 -> bfloat16 / float16 inside kernels rounds like Tensor.to (nearest even), on random
    bit patterns (every exponent, subnormals, inf, NaN) and on exact ties."""
    gen = torch.Generator().manual_seed(1)
    patterns = torch.randint(-(2**31), 2**31, (16384,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(-(2**15), 2**15, (2048,), generator=gen, dtype=torch.int32) << 16) | 0x8000
    x = torch.cat([patterns.view(torch.float32), ties.view(torch.float32), torch.tensor([65520.0, 3.4e38, -0.0])])
    x = x.to(device)
    as_bf16 = torch.empty_like(x, dtype=torch.bfloat16)
    as_fp16 = torch.empty_like(x, dtype=torch.float16)
    n, block = x.numel(), 4096
    _cast_kernel[(triton.cdiv(n, block),)](x, as_bf16, as_fp16, n, BLOCK=block)
    _assert_bitwise(as_bf16, x.to(torch.bfloat16), "cast_rne bfloat16")
    _assert_bitwise(as_fp16, x.to(torch.float16), "cast_rne float16")


# ----------------------------------------------------------------------------- float64 scalar path

QPARAM_CASES = [
    # (lo, hi, theta, bits, signed)
    (-0.7, 1.3, 0.0, 4, False),
    (-1.0, 2.75, 0.37, 4, True),
    (0.5, 3.0, -1.2, 8, False),  # positive range: lo' = 0
    (-3.0, -0.5, 2.0, 3, False),  # negative range: hi' = 0, z = qmax
    (0.0, 0.0, 0.4, 2, True),  # degenerate: S = 1, z = 0
    (1e-9, 2e-9, 0.0, 8, False),  # S clamps to 2^-23
    (-0.3, 0.9, 28.0, 5, False),  # just under the softplus threshold (theta * ln2 = 19.4)
    (-0.3, 0.9, 28.8539008177, 5, False),  # on it
    (-0.3, 0.9, 31.5, 5, False),  # above: l = theta, dl = 1
    (-0.3, 0.9, -30.0, 5, False),  # tiny l: log1p accuracy
    (-0.3, 0.9, -700.0, 5, False),
    (-123.456, 7.89, 1.0, 7, True),
    (math.nan, 1.0, 0.0, 4, False),
]


@pytest.mark.parametrize("case", QPARAM_CASES, ids=[f"{c[0]}_{c[1]}_{c[2]}" for c in QPARAM_CASES])
def test_qparams_match_reference(device, case):
    """Observer and softplus (float64 in the kernel) against the reference backend: range, S and z
    bit for bit; l and dl/dtheta within one float32 ulp (exp/log1p may differ in the last double bit)."""
    lo, hi, theta, bits, signed = case
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2)).to(device)
    t = torch.tensor([theta], device=device)
    o = torch.tensor([0.25], device=device)
    lo_hi = torch.tensor([lo, hi], device=device)
    y, qp = triton_backend.batchquant_forward(x, t, o, lo_hi, bits, signed, 3, 4)
    y_ref, qp_ref = reference.batchquant_forward(x.cpu(), t.cpu(), o.cpu(), lo_hi.cpu(), bits, signed, 3, 4)
    qp = qp.cpu()
    _assert_bitwise(qp[[LO, HI, SCALE, ZERO]], qp_ref[[LO, HI, SCALE, ZERO]], "lo, hi, S, z")
    torch.testing.assert_close(qp[[L, DL_DTHETA]], qp_ref[[L, DL_DTHETA]], rtol=2.0**-23, atol=0.0, equal_nan=True)
    if qp[L] == qp_ref[L]:
        _assert_bitwise(y, y_ref, "y")


# ----------------------------------------------------------------------------- grids and partials


def _run_all(x, g, theta, offset, bits, signed, backend, lo_hi=None):
    xi = x.clone().requires_grad_(True)
    t = theta.clone().requires_grad_(True)
    o = offset.clone().requires_grad_(True)
    y, used = bk.batchquant(xi, t, o, bits, signed=signed, lo_hi=lo_hi, return_range=True, backend=backend)
    y.backward(g)
    return y.detach(), used, xi.grad, t.grad, o.grad


BIG_CASES = [
    # (shape, layout, target programs): many empty splits and 2 channel blocks (rows), multi-tile
    # splits (planes), several grid-stride iterations per backward program
    ((33, 130), "contiguous", 200),
    ((2, 3, 50, 50), "contiguous", 12),
    ((3, 20, 9, 7), "channels_last", 7),
    ((4, 1, 40, 40), "contiguous", 3),
]


@pytest.mark.parametrize("case", range(len(BIG_CASES)))
def test_multi_program_grids_match_reference(device, many_programs, case):
    """With many programs per reduction the results equal the float32 reference backend: the range,
    the qparams, y and grad_x bit for bit (same float32 ops in the same order), scalar gradients
    to float32 summation accuracy."""
    shape, layout, programs = BIG_CASES[case]
    many_programs(programs)
    gen = torch.Generator().manual_seed(case)
    x = torch.randn(shape, generator=gen) * torch.logspace(-1, 1, shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
    if case % 2:
        x = x.clamp(min=0)  # post-ReLU zeros on u = qmin
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen)
    theta, offset = torch.tensor([0.3]), torch.tensor([-0.2])
    got = _run_all(x.to(device), g.to(device), theta.to(device), offset.to(device), 4, False, "triton")
    want = _run_all(x, g, theta, offset, 4, False, "reference")
    for name, a, b in zip(("y", "range", "grad_x"), got[:3], want[:3], strict=True):
        _assert_bitwise(a.cpu(), b, name)
    assert got[0].stride() == x.stride()
    torch.testing.assert_close(got[3].cpu(), want[3], rtol=1e-5, atol=1e-5 * float(g.abs().sum()) * 1e-3)
    torch.testing.assert_close(got[4].cpu(), want[4], rtol=1e-5, atol=1e-5 * float(g.abs().sum()) * 1e-3)


def test_lsq_multi_program_matches_reference(device, many_programs):
    many_programs(5)
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(96, 3, 5, 5, generator=gen) * 0.1
    g = torch.randn(w.shape, generator=gen)
    outs = []
    for backend, dev in (("triton", device), ("reference", "cpu")):
        wi = w.to(dev).requires_grad_(True)
        s = torch.tensor([-0.031], device=dev, requires_grad=True)  # negative: |s| forward, sign in grad
        w_hat = bk.lsq(wi, s, 4, numel_full=3 * w.numel(), backend=backend)
        w_hat.backward(g.to(dev))
        outs.append((w_hat.detach().cpu(), wi.grad.cpu(), s.grad.cpu()))
    _assert_bitwise(outs[0][0], outs[1][0], "w_hat")
    _assert_bitwise(outs[0][1], outs[1][1], "grad_w")
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-5, atol=0.0)


def test_finish_folds_partials_in_order(device):
    """The range finish (run by the last program of the range kernel) over synthetic partials:
    several split and channel iterations, empty splits (+inf/-inf), against float64 torch."""
    gen = torch.Generator().manual_seed(3)
    n_splits, C = 70, 150
    a = torch.randn(n_splits, C, generator=gen)
    b = a + torch.rand(n_splits, C, generator=gen)
    empty = torch.rand(n_splits, C, generator=gen) < 0.3
    empty[0] = False  # every channel has data somewhere
    part = torch.stack([a.masked_fill(empty, math.inf), b.masked_fill(empty, -math.inf)]).to(device)
    out = torch.empty(2, device=device)
    blocks = tbq.range_finish_blocks(n_splits, C)
    _finish_range_kernel[(1,)](part, out, n_splits, C, BLOCK_S=blocks["FINISH_S"], BLOCK_C=blocks["FINISH_C"])
    lo = part[0].cpu().double().amin(0).mean()
    hi = part[1].cpu().double().amax(0).mean()
    torch.testing.assert_close(out.cpu(), torch.stack([lo, hi]).float(), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_determinism_bitwise(device, many_programs, dtype, layout):
    """Two runs (fresh buffers, several programs per reduction; on a GPU the first run of this size
    also autotunes, re-launching the kernels) give the same bits."""
    many_programs(6)
    shape = (16, 24, 36, 36) if device == "cuda" else (3, 6, 12, 11)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    theta, offset = torch.tensor([0.1], device=device), torch.tensor([0.3], device=device)
    runs = [_run_all(x, g, theta, offset, 3, True, "triton") for _ in range(2)]
    for name, a, b in zip(("y", "range", "grad_x", "grad_theta", "grad_offset"), *runs, strict=True):
        _assert_bitwise(a, b, name)


def test_every_output_element_written(device, monkeypatch):
    """Every allocation the backend makes (outputs, qparams, partials) starts as NaN; with finite
    inputs no NaN may survive, so nothing was left unwritten."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(alloc):
        def make(*args, **kwargs):
            t = alloc(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t

        return make

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 7, 9, generator=gen).to(device)
    xs = [x, x.contiguous(memory_format=torch.channels_last), x.flatten(2)]
    g = torch.randn(x.shape, generator=gen).to(device)
    theta, offset = torch.tensor([0.2], device=device), torch.tensor([0.1], device=device)
    w = torch.randn(7, 3, 3, generator=gen).to(device)
    step = torch.tensor([0.1], device=device)
    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
    for xi in xs:
        _, C, inner = bk.ops.dense_activation(xi)
        outs = [triton_backend.batch_range(xi, C, inner)]
        for lo_hi in (None, torch.tensor([-1.0, 1.0], device=device)):
            y, qp = triton_backend.batchquant_forward(xi, theta, offset, lo_hi, 4, False, C, inner)
            outs += [y, qp, *triton_backend.batchquant_backward(g.reshape(xi.shape), xi, offset, qp, 4, False)]
        for i, out in enumerate(outs):
            assert not torch.isnan(out).any(), f"output {i} for x of shape {tuple(xi.shape)} has unwritten elements"
    outs = [triton_backend.lsq_forward(w, step, 3, True), *triton_backend.lsq_backward(w, w, step, 3, True, 999)]
    for i, out in enumerate(outs):
        assert not torch.isnan(out).any(), f"lsq output {i} has unwritten elements"


# ----------------------------------------------------------------------------- selection


def _python(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_devices_follow_the_interpreter():
    assert triton_backend.DEVICES == (("cuda", "cpu") if launch.INTERPRET else ("cuda",))
    assert triton_backend.DTYPES == (torch.float16, torch.bfloat16, torch.float32)


def test_unavailable_without_gpu_or_interpreter_or_triton():
    """One fresh interpreter (importing torch is the slow part): without TRITON_INTERPRET and
    without a visible GPU; then with triton not importable at all."""
    code = (
        "import importlib, sys\n"
        "from bquant_kernels.backends import triton as t\n"
        "print(t.DEVICES, t.available())\n"
        "prefixes = ('triton.', 'bquant_kernels.backends.triton')\n"
        "for name in [m for m in sys.modules if m == 'triton' or m.startswith(prefixes)]:\n"
        "    del sys.modules[name]\n"
        "del sys.modules['bquant_kernels.backends'].triton\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "t = importlib.import_module('bquant_kernels.backends.triton')\n"
        "print(t.available())\n"
        "try:\n"
        "    t.lsq_forward(None, None, 4, True)\n"
        "except RuntimeError as err:\n"
        "    print('raised:', err)\n"
    )
    out = _python(code, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    lines = out.splitlines()
    assert lines[0].startswith("('cuda',) (False, 'no CUDA device is visible"), out
    assert lines[1].startswith("(False, 'triton cannot be imported ("), out
    assert lines[2].startswith("raised: the triton backend's lsq_forward cannot run: triton cannot be imported"), out


# ----------------------------------------------------------------------------- torch.compile


class _TinyQuantNet(nn.Module):
    """conv (LSQ 4-bit weights) -> ReLU -> BatchQuant 4-bit -> pooled linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.step = nn.Parameter(torch.tensor([0.05]))
        self.theta = nn.Parameter(torch.tensor([0.2]))
        self.offset = nn.Parameter(torch.tensor([0.1]))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = bk.lsq(self.conv.weight, self.step, 4, backend="triton")
        h = F.relu(F.conv2d(x, w, self.conv.bias, padding=1))
        h = bk.batchquant(h, self.theta, self.offset, 4, backend="triton")
        return self.head(h.mean(dim=(2, 3)))


def test_torch_compile_fullgraph(device):
    """The ops trace into one graph (fullgraph=True fails on any graph break) and the compiled model
    matches eager, forward and gradients. Under the interpreter the graph is run by aot_eager:
    Inductor's CPU code generation would add minutes of C++ compilation on a small CI machine."""
    torch.manual_seed(0)
    model = _TinyQuantNet().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    results = []
    for m in (model, compiled):
        model.zero_grad()
        out = m(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
