"""Tests of ``bench/``: the eager baselines compute the spec's function, the timer, and a smoke run of the CLI."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bquant_kernels as bk
from bench.autograd_reference import batchquant_autograd, lsq_autograd  # bench/ is on pytest's pythonpath
from bench.eager_published import batchquant_published, lsq_published, published_qparams
from bench.timing import SAMPLE_S, time_cpu_interleaved, time_fn
from bquant_kernels.qparams import LN2, MIN_SCALE, batchquant_grid, lsq_grid

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- inputs and tolerances


def make_activation(shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    """float32 activations: channels of very different ranges, both signs (or post-ReLU with exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    ranges = torch.logspace(-2, 1.5, C)[torch.randperm(C, generator=gen)].view(1, C, *[1] * (len(shape) - 2))
    x = (torch.randn(shape, generator=gen) + 0.2) * ranges
    return x.clamp(min=0.0) if kind == "relu" else x


def case_seed(*key: object) -> int:
    """A seed derived from the test case (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(key).encode()) % 10_000


def scalar_params(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(1, generator=gen) - 0.5, torch.rand(1, generator=gen) * 0.6 - 0.3


def quant_step(lo_hi: torch.Tensor, theta: torch.Tensor, bits: int, signed: bool) -> float:
    """``S / l`` of spec 1.2-1.3, in float64."""
    qmin, qmax = batchquant_grid(bits, signed)
    lo, hi = min(float(lo_hi[0]), 0.0), max(float(lo_hi[1]), 0.0)
    scale = max((hi - lo) / (qmax - qmin), MIN_SCALE)
    return scale / float(F.softplus(theta.detach().double(), beta=LN2))


def check_quantized(y: torch.Tensor, ref: torch.Tensor, step: float, rtol: float) -> torch.Tensor:
    """Spec 4: every element within ``rtol`` (relative, plus 1e-6 of a step) or exactly one step away, the
    latter in at most 1e-4 of the positions (at least one). Returns the mask of one-step positions."""
    diff = (y.double() - ref.double()).abs()
    close = diff <= rtol * ref.double().abs() + 1e-6 * step
    one_step = (diff - step).abs() <= 1e-3 * step
    assert bool((close | one_step).all()), f"max error {float(diff.max())} with step {step}"
    flips = ~close
    allowed = max(1, math.floor(1e-4 * y.numel()))
    assert int(flips.sum()) <= allowed, f"{int(flips.sum())} elements one step apart, at most {allowed} allowed"
    return flips


def reference_batchquant(x, theta, offset, bits, signed, g):
    """float64 reference: ``(y, grad_x, grad_theta, grad_offset, lo_hi)``."""
    xd, td, od = (t.detach().double().requires_grad_() for t in (x, theta, offset))
    y, lo_hi = bk.batchquant(xd, td, od, bits, signed=signed, return_range=True, backend="reference")
    grads = torch.autograd.grad(y, (xd, td, od), g.double())
    return (y.detach(), *grads, lo_hi)


def check_batchquant_impl(impl, shape, kind, bits, signed, seed, *, inclusive_clamp: bool) -> None:
    x = make_activation(shape, kind, seed).requires_grad_()
    theta, offset = (p.requires_grad_() for p in scalar_params(seed))
    if kind == "relu":
        offset = torch.zeros(1, requires_grad=True)  # post-ReLU zeros land exactly on u = qmin
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 7))
    y_ref, gx_ref, gt_ref, go_ref, lo_hi = reference_batchquant(x, theta, offset, bits, signed, g)
    step = quant_step(lo_hi, theta, bits, signed)

    y = impl(x, theta, offset, bits, signed)
    gx, gt, go = torch.autograd.grad(y, (x, theta, offset), g)
    assert y.dtype == x.dtype and gx.dtype == x.dtype
    flips = check_quantized(y, y_ref, step, rtol=1e-6)

    on_bound = (x == 0) if kind == "relu" else torch.zeros_like(flips)
    if kind == "relu":
        assert bool(on_bound.any()), "the post-ReLU input must contain exact zeros"
    compare = ~flips if inclusive_clamp else ~(flips | on_bound)
    # The eager chain rule multiplies g by S/l and l/S: equal to g up to float32 rounding.
    torch.testing.assert_close(gx[compare], gx_ref[compare].float(), rtol=1e-6, atol=0)
    if not inclusive_clamp and kind == "relu":
        return  # the exclusive clamp changes grad_theta/grad_offset of every boundary element (documented)
    # Spec 4: 1e-4 relative, plus the change of dy/dl (one step / l) at each element one step apart.
    l = float(F.softplus(theta.detach().double(), beta=LN2))
    slack = float((g.double().abs() * flips).sum()) * step / l
    sigmoid = float(torch.sigmoid(theta.detach().double() * LN2))
    assert abs(float(gt) - float(gt_ref)) <= 1e-4 * abs(float(gt_ref)) + slack * sigmoid
    assert abs(float(go) - float(go_ref)) <= 1e-4 * abs(float(go_ref)) + 1e-12


SHAPES = [(8, 16, 10, 10), (4, 12, 50), (64, 40)]


# ----------------------------------------------------------------------------- BatchQuant


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("bits", "signed"), [(2, False), (4, True), (8, False)])
@pytest.mark.parametrize("kind", ["mixed", "relu"])
def test_published_batchquant_matches_reference(shape, bits, signed, kind):
    seed = case_seed(shape, bits, kind)

    def published(x, theta, offset, bits, signed):
        return batchquant_published(x, theta, offset, bits, signed=signed)

    check_batchquant_impl(published, shape, kind, bits, signed, seed, inclusive_clamp=False)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("bits", "signed"), [(2, False), (4, True), (8, False)])
@pytest.mark.parametrize("kind", ["mixed", "relu"])
def test_autograd_batchquant_matches_reference(shape, bits, signed, kind):
    seed = case_seed(shape, bits, kind)
    check_batchquant_impl(batchquant_autograd, shape, kind, bits, signed, seed, inclusive_clamp=True)


def test_published_clamp_boundary():
    """The documented deviation: post-ReLU zeros sit on u = qmin, where torch.clamp's gradient is 0 in
    recent PyTorch (the spec, like the PyTorch of the published runs, passes it)."""
    x = make_activation((4, 8, 6, 6), "relu", 3).requires_grad_()
    theta, offset = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    (gx,) = torch.autograd.grad(batchquant_published(x, theta, offset, 4), x, g)
    _, gx_ref, *_ = reference_batchquant(x, theta, offset, 4, False, g)
    zeros = x == 0
    assert bool(zeros.any())
    assert torch.equal(gx_ref[zeros].float(), g[zeros])  # the spec: inclusive
    # The published formulation follows torch.clamp: all zero (exclusive) or all passed (inclusive).
    exclusive = bool((gx[zeros] == 0).all())
    assert exclusive or torch.allclose(gx[zeros], g[zeros], rtol=1e-6, atol=0)
    torch.testing.assert_close(gx[~zeros], gx_ref[~zeros].float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["published", "autograd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_backend(impl, dtype):
    x = make_activation((8, 16, 7, 7), "mixed", 11).to(dtype).requires_grad_()
    theta, offset = (p.requires_grad_() for p in scalar_params(11))
    fn = batchquant_published if impl == "published" else batchquant_autograd
    y = fn(x, theta, offset, 4)
    y_ref, lo_hi = bk.batchquant(x, theta, offset, 4, return_range=True, backend="reference")
    assert y.dtype == dtype
    check_quantized(y, y_ref, quant_step(lo_hi, theta, 4, False), rtol=torch.finfo(dtype).eps)


def test_published_qparams_on_host():
    assert published_qparams(torch.tensor(0.0), torch.tensor(0.0), 4, False) == (1.0, 0)  # degenerate range
    scale, zero = published_qparams(torch.tensor(-1.0), torch.tensor(2.0), 2, False)
    assert scale == pytest.approx(1.0) and zero == 1
    with pytest.raises(ValueError, match="batch range"):
        published_qparams(torch.tensor(1.0), torch.tensor(-1.0), 4, False)


def test_published_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="bits"):
        batchquant_published(x, torch.zeros(1), torch.zeros(1), 9)
    with pytest.raises(ValueError, match="theta"):
        batchquant_published(x, torch.zeros(2), torch.zeros(1), 4)
    with pytest.raises(ValueError, match="x must"):
        batchquant_published(torch.randn(4), torch.zeros(1), torch.zeros(1), 4)
    with pytest.raises(ValueError, match="bits"):
        lsq_published(x, torch.ones(1), 1)


# ----------------------------------------------------------------------------- LSQ


@pytest.mark.parametrize("impl", ["published", "autograd"])
@pytest.mark.parametrize("shape", [(48, 16, 3, 3), (96, 1, 5, 5)], ids=["pointwise", "depthwise"])
@pytest.mark.parametrize(("bits", "signed"), [(2, True), (4, True), (8, True), (4, False)])
@pytest.mark.parametrize("sliced", [False, True])
def test_lsq_matches_reference(impl, shape, bits, signed, sliced):
    gen = torch.Generator().manual_seed(bits * 10 + shape[1])
    w = (0.05 * torch.randn(shape, generator=gen)).requires_grad_()
    qn, qp = lsq_grid(bits, signed)
    step = (0.8 * w.detach().abs().amax() / qp).reshape(1).requires_grad_()  # the largest fifth of the range clips
    numel_full = 3 * w.numel() if sliced else w.numel()
    g = torch.randn(shape, generator=gen)
    fn = lsq_published if impl == "published" else lsq_autograd
    y = fn(w, step, bits, signed=signed, numel_full=numel_full)
    gw, gs = torch.autograd.grad(y, (w, step), g)

    wd, sd = w.detach().double().requires_grad_(), step.detach().double().requires_grad_()
    y_ref = bk.lsq(wd, sd, bits, signed=signed, numel_full=numel_full, backend="reference")
    gw_ref, gs_ref = torch.autograd.grad(y_ref, (wd, sd), g.double())

    s = float(step.detach())
    flips = check_quantized(y, y_ref, s, rtol=1e-6)
    v = (wd / sd).detach()
    assert bool(((v <= qn) | (v >= qp)).any()), "the test data must clip"
    torch.testing.assert_close(gw[~flips], gw_ref[~flips].float(), rtol=1e-6, atol=0)
    k = 1.0 / math.sqrt(numel_full * qp)
    slack = float((g.double().abs() * flips).sum()) * k  # d w_hat / d s moves by one at a one-step element
    assert abs(float(gs) - float(gs_ref)) <= 1e-4 * abs(float(gs_ref)) + slack


# ----------------------------------------------------------------------------- timing and the CLI


def test_time_fn_cpu_median():
    t = time_fn(lambda: time.sleep(2e-3), device="cpu", min_total_s=0.02, warmup_s=0.0, min_reps=3)
    assert 2e-3 <= t < 0.2
    with pytest.raises(ValueError, match="min_total_s"):
        time_fn(lambda: None, device="cpu", min_total_s=0.0)


def test_time_cpu_interleaved_takes_turns():
    order: list[str] = []

    def sleeper(name: str, seconds: float):
        def fn():
            order.append(name)
            time.sleep(seconds)

        return fn

    short, long = 1.2 * SAMPLE_S, 2.4 * SAMPLE_S
    times = time_cpu_interleaved(
        {"short": sleeper("short", short), "long": sleeper("long", long)}, min_total_s=0.03, warmup_s=0.0, min_reps=4
    )
    assert list(times) == ["short", "long"]
    assert short <= times["short"] < long <= times["long"] < 0.2
    # After two warm-up calls each, one call per sample (each call outlasts SAMPLE_S), taken in turns: a
    # rotating order, so never more than two samples of one callable in a row.
    assert order[:4] == ["short", "short", "long", "long"]
    timed = order[4:]
    assert timed.count("short") >= 4 and timed.count("long") >= 4
    runs = [len(list(group)) for _, group in itertools.groupby(timed)]
    assert max(runs) <= 2, order
    with pytest.raises(ValueError, match="min_reps"):
        time_cpu_interleaved({"f": lambda: None}, min_reps=0)


@pytest.mark.parametrize("bad", [["--shapes", "64x"], ["--shapes", "64"], ["--dtypes", "int8"], ["--bits", "9"]])
def test_kernels_rejects_bad_arguments(bad, capsys):
    from bench.kernels import main

    with pytest.raises(SystemExit) as exc:
        main(bad)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_kernels_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/kernels.py", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vs eager" in proc.stdout
    report = json.loads(out.read_text())
    for key in ("date", "command", "device", "torch", "backends", "settings", "rows", "summary"):
        assert key in report, key
    assert report["device"]["type"] in ("cpu", "cuda") and report["device"]["name"]
    assert "--quick" in report["command"]
    rows = report["rows"]
    row_keys = {"op", "shape", "dtype", "memory_format", "impl", "pass", "median_s", "gbps", "bytes"}
    assert all(row_keys <= set(r) and r["error"] is None for r in rows)
    seen = {(r["op"], r["impl"], r["pass"]) for r in rows}
    for op in ("batchquant", "lsq"):
        for impl in ("eager", "reference"):
            for pass_ in ("fwd", "fwd+bwd"):
                assert (op, impl, pass_) in seen
    for r in rows:
        assert r["median_s"] > 0 and r["gbps"] > 0
        assert r["mismatch_fraction"] <= 1e-4, r  # every implementation computes the reference's function
        if r["impl"] == "eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- gpu_check.sh


def test_host_overhead_json(tmp_path):
    from bench.host_overhead import main

    out = tmp_path / "host.json"
    assert main(["--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    routes = {(r["backend"], r["route"]) for r in rows}
    assert ("reference", "eager fwd+bwd") in routes and ("reference", "custom op fwd+bwd") in routes
    assert all(r["median_s"] > 0 for r in rows)
    assert not list(tmp_path.glob("*.tmp"))


def test_throw_probe_sees_every_cpu_throw_reach_python(capsys, monkeypatch, tmp_path):
    """bench/throw_probe.py (a gpu_check stage) must report a C++ check that throws as "raised"
    here, where none crashes: else its verdicts on the GPU machine would mean nothing."""
    from bench.throw_probe import PROBES, main

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the probes build their extension
    assert main() == 0
    assert list(tmp_path.iterdir()) == []  # and remove it again
    out = capsys.readouterr().out
    for name, (needs, _code) in PROBES.items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert "raised: " in line or (needs and f"skipped: needs a {needs}" in line), line
    assert "numel_full must be >= w.numel()" in out  # the throw came from the C++ CPU kernel


def test_gpu_check_script_runs_its_frame_without_a_gpu(tmp_path):
    """bench/gpu_check.sh runs only on a lent GPU; its frame (stage selection, summary JSON, the
    8-file limit of what comes back) is checked here with no stage selected."""
    script = REPO / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "STAGES": "none", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    expected = {
        "build",
        "isolated",
        "throw_probe",
        "native_bt",
        "pytest",
        "kernels",
        "lsq_multi",
        "train_step",
        "epilogue",
        "profile",
    }
    assert set(summary["stages"]) == expected
    assert all(stage["rc"] == "not-run" for stage in summary["stages"].values())
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool brings back at most 8 files
