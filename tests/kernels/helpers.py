"""Shared test helpers: backend/device matrix, input generators, spec-tolerance comparisons."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bquant_kernels as bk
from bquant_kernels.backends import get_backend

# (backend, device) pairs the parity suite runs; unavailable ones are skipped with the reason.
BACKEND_DEVICES = [
    ("reference", "cpu"),
    ("cpu", "cpu"),
    ("triton", "cpu"),
    ("reference", "cuda"),
    ("cuda", "cuda"),
    ("triton", "cuda"),
]

DTYPE_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def require(backend: str, device: str, dtype: torch.dtype | None = None) -> None:
    """Skip (with the reason) unless ``backend`` runs on ``device`` (and ``dtype``) here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (GPU tests run via bench/gpu_check.sh)")
    ok, why = bk.backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    impl = get_backend(backend)
    if device not in impl.DEVICES:
        pytest.skip(f"backend {backend!r} does not run on {device} here (DEVICES={impl.DEVICES})")
    if dtype is not None and dtype not in impl.DTYPES:
        pytest.skip(f"backend {backend!r} does not support {dtype}")


def make_activation(shape, *, kind: str = "mixed", seed: int = 0) -> torch.Tensor:
    """Random float64 activations: channels of very different ranges, signs, exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    C = shape[1]
    ranges = torch.logspace(-2, 1.5, C, dtype=torch.float64)[torch.randperm(C, generator=gen)]
    x = x * ranges.view(1, C, *([1] * (len(shape) - 2)))
    if kind == "relu":
        x = x.clamp(min=0.0)  # post-ReLU: exact zeros sit on u = qmin
    elif kind == "shifted":
        x = x + 0.3 * ranges.view(1, C, *([1] * (len(shape) - 2)))
    elif kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    return x


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return (
            x.contiguous(memory_format=torch.channels_last)
            if x.dim() == 4
            else x.transpose(1, -1).contiguous().transpose(1, -1)
        )
    if layout == "sliced":  # not dense: every other channel of a wider tensor
        base = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        base[:, ::2] = x
        return base[:, ::2]
    if layout == "noncontig":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 3 else x.t().contiguous().t()
    return x.contiguous()


def poison_heap(nbytes: int, device: str) -> None:
    """Fill then free a block of the output's size, so an unwritten output element reads as NaN.

    The CUDA caching allocator and the CPU heap hand the freed block to the next allocation of that size.
    """
    t = torch.full((max(nbytes // 4, 1),), float("nan"), dtype=torch.float32, device=device)
    del t


def allowed_flips(n: int) -> int:
    """Spec 4: at most 1e-4 of positions may differ by one step (at least one position on tiny tensors)."""
    return max(1, math.floor(1e-4 * n))


def assert_quant_close(y: torch.Tensor, y_ref: np.ndarray, step: float, dtype: torch.dtype, what: str = "y") -> None:
    """``y`` equals the float64 ``y_ref`` within the dtype's rounding, except <= allowed one-step flips."""
    got = y.detach().double().cpu().numpy()
    assert np.isfinite(got).all() or not np.isfinite(y_ref).all(), f"{what}: non-finite (unwritten?) elements"
    rtol = DTYPE_RTOL[dtype]
    atol = rtol * step  # y is a multiple of the step; values near 0 get a step-relative tolerance
    diff = np.abs(got - y_ref)
    ok = diff <= atol + rtol * np.abs(y_ref)
    flips = np.abs(diff - step) <= atol + rtol * np.abs(y_ref) + 1e-6 * step
    bad = ~ok & ~flips
    assert not bad.any(), (
        f"{what}: {bad.sum()} elements off by more than rounding, e.g. got {got[bad][:5]} want {y_ref[bad][:5]}"
    )
    nflip = int((~ok).sum())
    assert nflip <= allowed_flips(y_ref.size), f"{what}: {nflip} one-step flips > {allowed_flips(y_ref.size)} allowed"


def assert_scalar_close(got: torch.Tensor, want: float, scale: float, rtol: float, what: str) -> None:
    """Scalar gradient within ``rtol`` relative, measured against the sum of |terms| (robust to cancellation)."""
    g = float(got.detach().double().cpu().reshape(-1)[0])
    tol = rtol * max(abs(want), scale, 1e-30)
    assert abs(g - want) <= tol, f"{what}: got {g!r}, want {want!r} (tol {tol:.3g})"


REPO = Path(__file__).resolve().parents[2]


def assert_cpu_instances_agree(script: str, cases: list, tmp_path: Path) -> None:
    """Run ``script`` (argv: the inputs file, the outputs file, the repository) on ``cases`` once under
    ATEN_CPU_CAPABILITY=default (the baseline instance of the CPU kernels) and once as this process runs
    (AVX2 where the CPU has it): every saved output equal bit for bit, signed zeros and NaN payloads
    included. Inputs are made here: torch's own random generators differ between capabilities."""
    inputs = tmp_path / "inputs.pt"
    torch.save(cases, inputs)
    outputs = {}
    for name, capability in (("portable", "default"), ("native", None)):
        env = dict(os.environ)
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        path = tmp_path / f"{name}.pt"
        cmd = [sys.executable, "-c", script, str(inputs), str(path), str(REPO)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = torch.load(path)
    assert len(outputs["portable"]) == len(outputs["native"]) > 0
    for i, (a, b) in enumerate(zip(outputs["portable"], outputs["native"], strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), f"output {i}: layouts differ"
        a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
        same = a.view(torch.uint8).reshape(a.numel(), -1).eq(b.view(torch.uint8).reshape(b.numel(), -1)).all(1)
        assert same.all(), f"output {i}: portable and native instances differ in {int((~same).sum())} elements"
