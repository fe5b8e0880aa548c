"""Fused epilogue ``bquant_kernels.epilogue.bn_act_quant`` (``cpu`` and ``triton`` backends) against the
composition of today's ops.

The oracle is the reference backend (F.batch_norm -> activation -> batchquant) on float64 copies of
the inputs; float16/bfloat16 are compared with the composition run in that dtype (it rounds BN's and
the activation's outputs to 16 bits, which moves values across bin edges far more often than the
spec's 1e-4: the fused kernels round at the same places).
"""

from __future__ import annotations

import helpers as h
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bquant_kernels import batchquant
from bquant_kernels.epilogue import bn_act_quant, fused_backend
from bquant_kernels.qparams import batchquant_grid

pytestmark = pytest.mark.usefixtures("one_thread")

ACTS = (None, "relu", "h_swish")
SHAPES = ((4, 6, 5, 7), (3, 5, 1, 1), (7, 9), (2, 3, 11), (16, 40, 4, 4))


def _require_cpu_kernel() -> None:
    y = torch.zeros(1, 1)
    if fused_backend("cpu", y) != "cpu":
        pytest.skip("the compiled extension (native_bn_act_quant) is not built here")


def _require_fused(backend: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip (with the reason) unless ``backend``'s fused kernels run on CPU tensors of ``dtype`` here (the
    triton backend: under TRITON_INTERPRET=1, which tests/conftest.py sets where there is no GPU)."""
    if backend == "cpu":
        _require_cpu_kernel()
        return
    h.require(backend, "cpu", dtype)
    assert fused_backend(backend, torch.zeros(1, 1, dtype=dtype)) == backend


def _params(C: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 1)
    gamma = (torch.rand(C, generator=gen, dtype=torch.float64) * 2 - 0.5).to(dtype)  # some negative
    beta = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype)
    theta = torch.tensor([0.3], dtype=torch.float64)
    offset = torch.tensor([0.2], dtype=torch.float64)
    rm = (0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype)
    rv = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    lo_hi = torch.tensor([-0.7, 1.9], dtype=torch.float64)
    return gamma, beta, theta, offset, rm, rv, lo_hi


def _run(y, gamma, beta, theta, offset, *, act, bits, mode, rm, rv, lo_hi, backend, residual=None, keep=False):
    """Forward + backward of one call: (out, [grads of y, gamma, beta(, theta, offset)(, residual)], mean, var,
    used, g, kept); with ``keep`` a second random gradient flows into the kept activation."""
    leaves = [t.detach().clone().requires_grad_() for t in (y, gamma, beta, theta, offset)]
    if bits is None:
        leaves = leaves[:3]
    kwargs = {"act": act, "return_stats": True, "backend": backend, "return_activation": keep}
    if residual is not None:
        leaves.append(residual.detach().clone().requires_grad_())
        kwargs["residual"] = leaves[-1]
    if mode != "train":  # "eval": running statistics and the stored range; "running": running statistics only
        kwargs.update(running_mean=rm, running_var=rv)
    if bits is not None:
        kwargs.update(theta=leaves[3], offset=leaves[4], bits=bits, lo_hi=lo_hi if mode == "eval" else None)
    result = bn_act_quant(leaves[0], leaves[1], leaves[2], **kwargs)
    (out, kept), (mean, var, used) = (result[:2], result[2:]) if keep else ((result[0], None), result[1:])
    g, g_kept = _grad_outputs(y)
    outputs, grad_outputs = ([out, kept], [g, g_kept]) if keep else ([out], [g])
    grads = torch.autograd.grad(outputs, leaves, grad_outputs)
    return out, grads, mean, var, used, g, kept


def _grad_outputs(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gradients of the output and of the kept activation, in ``y``'s dtype, device and layout."""
    gen = torch.Generator().manual_seed(7)
    layout = "channels_last" if not y.is_contiguous() else "contiguous"
    g, g_kept = (torch.randn(y.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    return (h.to_layout(t.to(y.device, y.dtype), layout) for t in (g, g_kept))


def _step(used: torch.Tensor, theta: torch.Tensor, bits: int) -> float:
    """One quantization step S / l (spec 1.2-1.3) of the range that was used."""
    qmin, qmax = batchquant_grid(bits, False)
    lo, hi = min(float(used[0]), 0.0), max(float(used[1]), 0.0)
    l = float(torch.nn.functional.softplus(theta.double(), beta=float(np.log(2.0))))
    return max((hi - lo) / (qmax - qmin), 2.0**-23) / l


def _composition(y, gamma, beta, theta, offset, *, act, bits, mode, rm, rv, lo_hi, residual=None, keep=False):
    """The oracle written out: F.batch_norm -> activation (-> + residual) -> batchquant on the reference
    backend, autograd through all of them, as (out, grads, mean, var, used, kept) like :func:`_run`."""
    leaves = [t.detach().clone().requires_grad_() for t in (y, gamma, beta, theta, offset)]
    leaves = leaves[:3] if bits is None else leaves
    if residual is not None:
        leaves.append(residual.detach().clone().requires_grad_())
    train = mode == "train"
    z = F.batch_norm(leaves[0], None if train else rm, None if train else rv, leaves[1], leaves[2], train, 0.0, 1e-5)
    a = {None: z, "relu": F.relu(z) if act == "relu" else None, "h_swish": F.hardswish(z)}[act]
    if residual is not None:
        a = a + leaves[-1]
    kept, used = a, None
    if bits is not None:
        a, used = batchquant(a, leaves[3], leaves[4], bits, lo_hi=lo_hi if mode == "eval" else None,
                             return_range=True, backend="reference")  # fmt: skip
    if train:
        var, mean = torch.var_mean(y, dim=[d for d in range(y.dim()) if d != 1], correction=0)
    else:
        mean, var = rm, rv
    g, g_kept = _grad_outputs(y)
    outputs, grad_outputs = ([a, kept], [g, g_kept]) if keep else ([a], [g])
    return a, torch.autograd.grad(outputs, leaves, grad_outputs), mean, var, used, kept if keep else None


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits", [None, 3])
@pytest.mark.parametrize("mode", ["train", "eval", "running"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_backend_is_the_composition(shape, act, bits, mode, dtype):
    """The oracle's route (the autograd.Function over the reference backend's forward / backward) gives
    the bits of the separate ops with autograd through them: forward, statistics and every gradient."""
    layout = "channels_last" if len(shape) == 4 else "contiguous"
    y = h.to_layout(h.make_activation(shape, kind="shifted", seed=3).to(dtype), layout)
    gamma, beta, theta, offset, rm, rv, lo_hi = (t.to(dtype) for t in _params(shape[1], 3))
    args = {"act": act, "bits": bits, "mode": mode, "rm": rm, "rv": rv, "lo_hi": lo_hi}
    got = _run(y, gamma, beta, theta, offset, backend="reference", **args)
    want = _composition(y, gamma, beta, theta, offset, **args)
    assert got[0].stride() == y.stride()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[2].to(dtype), want[2], rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    torch.testing.assert_close(got[3].to(dtype), want[3], rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12)
    if bits is not None:
        torch.testing.assert_close(got[4], want[4].to(got[4].dtype), rtol=0, atol=0)


MODES = ("train", "eval", "running")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "backend, dtype", [("cpu", torch.float32), ("cpu", torch.float64), ("triton", torch.float32)]
)  # the triton backend has no float64 (bquant_kernels.backends.triton.DTYPES)
def test_fused_matches_float64_composition(shape, layout, act, bits, mode, backend, dtype):
    _require_fused(backend, dtype)
    _check_fused(shape, layout, act, bits, mode, backend, dtype, "cpu")


@pytest.mark.parametrize("shape", SHAPES[::2])  # odd sizes, 2-D, a tile-sized one: within gpu_check's time
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_on_cuda_matches_float64_composition(shape, layout, act, bits, mode, backend):
    """The Triton kernels compiled for and run on a GPU (the cuda backend's epilogue is Triton's):
    bench/gpu_check.sh runs this before it times them (bench/epilogue.py)."""
    h.require(backend, "cuda", torch.float32)
    assert fused_backend(backend, torch.zeros(1, 1, device="cuda")) == "triton"
    _check_fused(shape, layout, act, bits, mode, backend, torch.float32, "cuda")


@pytest.mark.parametrize(
    "shape",
    # 2997 rows (81 per wide row, a partial run; statistics: 8 blocks of 336 rows and a partial one), 12 = one
    # tile + 4; rows of 323 (channels_last: 2 blocks of 1360 rows)
    [(37, 12, 9, 9), (5, 3, 17, 19)],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ["relu", "h_swish"])
@pytest.mark.parametrize("mode", ["train", "running"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_runs_and_wide_rows(shape, layout, act, mode, dtype):
    """The CPU kernel's blocking: float32 runs of 16 rows / vectors folded into float64 (several runs and
    a partial one), channels_last statistics in blocks of rows, channels_last rows widened to r * C
    channels (tiled, folded back), tile remainders."""
    _require_cpu_kernel()
    _check_fused(shape, layout, act, 4, mode, "cpu", dtype, "cpu")


def _check_fused(shape, layout, act, bits, mode, backend, dtype, device, residual=False, keep=False):
    """``backend``'s fused op on ``device`` against the reference's float64 composition on the CPU (with a
    random residual added after the activation, and the activation kept, when asked)."""
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("2-D tensors have one memory format")
    y64 = h.make_activation(shape, kind="shifted", seed=sum(shape))
    r64 = h.to_layout(h.make_activation(shape, seed=sum(shape) + 1), layout) if residual else None
    gamma, beta, theta, offset, rm, rv, lo_hi = _params(shape[1], sum(shape))
    args = {"act": act, "bits": bits, "mode": mode, "keep": keep}
    ref = _run(h.to_layout(y64, layout), gamma, beta, theta, offset, rm=rm, rv=rv, lo_hi=lo_hi, backend="reference",
               residual=r64, **args)  # fmt: skip
    y = h.to_layout(y64.to(device, dtype), layout)
    r = None if r64 is None else h.to_layout(r64.to(device, dtype), layout)
    c = [t.to(device, dtype) for t in (gamma, beta, theta, offset, rm, rv, lo_hi)]
    h.poison_heap(y.numel() * y.element_size(), device)
    out, grads, mean, var, used, _, kept = _run(y, *c[:4], rm=c[4], rv=c[5], lo_hi=c[6], backend=backend,
                                                residual=r, **args)  # fmt: skip
    assert out.dtype == dtype and out.shape == y.shape and out.stride() == y.stride() and out.device == y.device
    out, grads, mean, var = out.cpu(), [t.cpu() for t in grads], mean.cpu(), var.cpu()
    used = None if used is None else used.cpu()
    ref_out = ref[0].detach().double().numpy()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    if bits is None:
        np.testing.assert_allclose(out.detach().double().numpy(), ref_out, rtol=tol, atol=tol * np.abs(ref_out).max())
    else:
        h.assert_quant_close(out, ref_out, _step(ref[4], theta, bits), dtype)
        torch.testing.assert_close(used.double(), ref[4].double(), rtol=1e-6, atol=1e-7)
    if keep:
        assert kept.dtype == dtype and kept.shape == y.shape and kept.stride() == y.stride()
        ref_kept = ref[6].detach().double().numpy()
        np.testing.assert_allclose(kept.detach().cpu().double().numpy(), ref_kept, rtol=tol,
                                   atol=tol * np.abs(ref_kept).max())  # fmt: skip
    # The mean within a fraction of the channel's spread: what BN's output sees (|mean| >> std costs
    # nothing). The Triton kernels (triton and cuda backends) sum in float32 (shifted by the channel's
    # first element; per-program partials folded in float64), the cpu backend in float32 runs of 16
    # rows or vectors folded in float64.
    ref_mean, ref_var = ref[2].double(), ref[3].double()
    mean_tol = (1e-6 if backend == "cpu" else 2e-6) * (ref_mean.abs() + ref_var.sqrt()) + 1e-7
    assert ((mean.double() - ref_mean).abs() <= mean_tol).all(), f"mean: {mean} want {ref_mean}"
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-7)
    # Gradients. float64: no bin flips, every gradient tight. float32: a flip moves a whole channel's
    # BN gradient by about g / count, so grad_y, gamma, beta (and the residual's) are compared in norm.
    tensor_grads = list(zip(("y", "gamma", "beta"), grads[:3], ref[1][:3], strict=True))
    if residual:
        tensor_grads.append(("residual", grads[-1], ref[1][-1]))
    for name, got, want in tensor_grads:
        got, want = got.double(), want.double()
        assert torch.isfinite(got).all(), f"grad {name}: non-finite (unwritten?) elements"
        err = (got - want).norm() / want.norm().clamp_min(1e-30)
        assert err <= (1e-10 if dtype == torch.float64 else 1e-4), f"grad {name}: relative error {err:.3g}"
    if bits is not None:
        scale = float(ref[1][0].abs().sum())  # sum of |terms| order of magnitude
        for name, got, want in zip(("theta", "offset"), grads[3:5], ref[1][3:5], strict=True):
            h.assert_scalar_close(got, float(want), max(scale, 1.0) * 1e-3, 1e-4, f"grad {name}")


# (bits, keep): BN + act + residual only; quantized; quantized with the activation kept for a shortcut.
RESIDUAL_CASES = ((None, False), (4, False), (4, True))


@pytest.mark.parametrize("shape", SHAPES[::2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits, keep", RESIDUAL_CASES)
@pytest.mark.parametrize("mode", ["train", "running"])
@pytest.mark.parametrize("backend, dtype", [("cpu", torch.float32), ("cpu", torch.float64), ("triton", torch.float32)])
def test_residual_fused_matches_float64_composition(shape, layout, act, bits, keep, mode, backend, dtype):
    """``batchquant(act(bn(y)) + residual)`` (and the kept activation, with a gradient of its own): every
    output and gradient, the residual's included, against the float64 composition."""
    _require_fused(backend, dtype)
    _check_fused(shape, layout, act, bits, mode, backend, dtype, "cpu", residual=True, keep=keep)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bits, keep", RESIDUAL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_reference_is_the_composition(shape, act, bits, keep, dtype):
    """The oracle's route with a residual and the kept activation: the bits of the separate ops."""
    layout = "channels_last" if len(shape) == 4 else "contiguous"
    y = h.to_layout(h.make_activation(shape, kind="shifted", seed=3).to(dtype), layout)
    r = h.to_layout(h.make_activation(shape, seed=4).to(dtype), layout)
    gamma, beta, theta, offset, rm, rv, lo_hi = (t.to(dtype) for t in _params(shape[1], 3))
    args = {"act": act, "bits": bits, "mode": "train", "rm": rm, "rv": rv, "lo_hi": lo_hi, "keep": keep}
    got = _run(y, gamma, beta, theta, offset, backend="reference", residual=r, **args)
    want = _composition(y, gamma, beta, theta, offset, residual=r, **args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    if keep:
        torch.testing.assert_close(got[6], want[5], rtol=0, atol=0)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES[::2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ["relu", "h_swish"])
@pytest.mark.parametrize("bits, keep", RESIDUAL_CASES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_residual_on_cuda_matches_float64_composition(shape, layout, act, bits, keep, backend):
    """The residual and kept-activation kernels on a GPU (bench/gpu_check.sh runs this)."""
    h.require(backend, "cuda", torch.float32)
    _check_fused(shape, layout, act, bits, "train", backend, torch.float32, "cuda", residual=True, keep=keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("residual, keep", [(False, False), (True, True)], ids=["plain", "residual-kept"])
def test_16bit_matches_the_composition_in_that_dtype(dtype, act, layout, backend, residual, keep):
    _require_fused(backend, dtype)
    shape = (8, 12, 6, 5)
    y = h.to_layout(h.make_activation(shape, kind="shifted", seed=3).to(dtype), layout)
    r = h.to_layout(h.make_activation(shape, seed=4).to(dtype), layout) if residual else None
    gamma, beta, theta, offset, rm, rv, lo_hi = _params(shape[1], 3, torch.float32)
    args = {"act": act, "bits": 4, "mode": "train", "rm": rm, "rv": rv, "lo_hi": lo_hi, "residual": r, "keep": keep}
    ref = _run(y, gamma, beta, theta.float(), offset.float(), backend="reference", **args)
    h.poison_heap(y.numel() * y.element_size(), "cpu")
    got = _run(y, gamma, beta, theta.float(), offset.float(), backend=backend, **args)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1])
    diff = (got[0].double() - ref[0].double()).abs()
    step = _step(ref[4], theta, 4)
    rounding = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * ref[0].double().abs()
    flips = int((diff > rounding + 1e-6 * step).sum())
    assert (diff <= rounding + step * 1.01).all()
    assert flips <= h.allowed_flips(y.numel()), f"{flips} one-step flips"
    if keep:  # rounded where the composition rounds; a value on a 16-bit rounding midpoint may round
        # the other way (BN's statistics differ from PyTorch's in their last float32 bits on triton)
        diff_kept = (got[6].double() - ref[6].double()).abs()
        assert (diff_kept <= 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * ref[6].double().abs()).all()
        assert int((diff_kept > 0).sum()) <= h.allowed_flips(y.numel())
    names = ("y", "gamma", "beta", "theta", "offset", "residual")[: len(ref[1])]
    for name, a, b in zip(names, got[1], ref[1], strict=True):
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        assert err <= 2e-2, f"grad {name}: relative error {err:.3g}"


@pytest.mark.parametrize("backend, dtype", [("cpu", torch.float64), ("triton", torch.float32)])
def test_post_relu_zeros_and_constant_channels(backend, dtype):
    """ReLU's exact zeros sit on the quantizer's qmin; a constant channel has var = 0 (z = beta)."""
    _require_fused(backend, dtype)
    y = h.make_activation((6, 5, 4, 4), kind="relu", seed=11)
    y[:, 2] = 0.25  # constant channel
    gamma, beta, theta, offset, *_ = _params(5, 11)
    ref = _run(y, gamma, beta, theta, offset, act="relu", bits=3, mode="train", rm=None, rv=None, lo_hi=None,
               backend="reference")  # fmt: skip
    params = [t.to(dtype) for t in (gamma, beta, theta, offset)]
    out = _run(y.to(dtype), *params, act="relu", bits=3, mode="train", rm=None, rv=None, lo_hi=None, backend=backend)
    assert torch.equal(out[3][2], torch.zeros((), dtype=out[3].dtype)), "constant channel: var must be exactly 0"
    if dtype == torch.float64:
        torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(out[1], ref[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        return
    h.assert_quant_close(out[0], ref[0].detach().numpy(), _step(ref[4], theta, 3), dtype)
    for name, a, b in zip(("y", "gamma", "beta"), out[1][:3], ref[1][:3], strict=True):
        err = (a.double() - b).norm() / b.norm()
        assert err <= 1e-4, f"grad {name}: relative error {err:.3g}"
    scale = max(float(ref[1][0].abs().sum()), 1.0)
    for name, a, b in zip(("theta", "offset"), out[1][3:], ref[1][3:], strict=True):
        h.assert_scalar_close(a, float(b), scale * 1e-3, 1e-4, f"grad {name}")


def test_result_does_not_depend_on_the_thread_count():
    _require_cpu_kernel()
    y = h.to_layout(h.make_activation((32, 24, 9, 9), seed=5).float(), "channels_last")
    gamma, beta, theta, offset, *_ = (t.float() for t in _params(24, 5))
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(_run(y, gamma, beta, theta, offset, act="h_swish", bits=4, mode="train", rm=None, rv=None,
                         lo_hi=None, backend="cpu"))  # fmt: skip
    torch.set_num_threads(1)
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the Triton interpreter's numpy min
@pytest.mark.parametrize("act", ["relu", "h_swish"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_nan_input_makes_the_range_nan(backend, act):
    _require_fused(backend)
    y = h.make_activation((4, 3, 5, 5), seed=2).float()
    y[1, 1, 2, 2] = float("nan")
    gamma, beta, theta, offset, *_ = (t.float() for t in _params(3, 2))
    out, _, _, used = bn_act_quant(y, gamma, beta, act=act, theta=theta, offset=offset, bits=4,
                                   return_stats=True, backend=backend)  # fmt: skip
    assert torch.isnan(used).all() and torch.isnan(out).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"act": "gelu"}, ValueError, "act must be one of"),
        ({"weight": torch.ones(4)}, ValueError, "weight must have shape"),
        ({"bits": 9}, ValueError, "bits must be in"),
        ({"bits": 4, "theta": None}, TypeError, "theta must be a torch.Tensor"),
        ({"running_mean": torch.zeros(3)}, ValueError, "running_mean and running_var"),
        ({"eps": 0.0}, ValueError, "eps must be a positive"),
        ({"y": torch.zeros(2, 3, dtype=torch.int32)}, TypeError, "y must be a floating tensor"),
        ({"y": torch.zeros(0, 3)}, ValueError, "y must not be empty"),
        ({"residual": torch.zeros(2, 3, 4, 5)}, ValueError, "residual must have the shape of y"),
        ({"residual": torch.zeros(2, 3, 4, 4, dtype=torch.float64)}, TypeError, "residual must have the dtype"),
        ({"residual": torch.zeros(2, 3, 4, 4, device="meta")}, ValueError, "residual is on meta"),
        ({"return_activation": True, "bits": None}, ValueError, "return_activation needs a quantizer"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = {"y": torch.randn(2, 3, 4, 4), "weight": torch.ones(3), "bias": torch.zeros(3),
            "theta": torch.zeros(1), "offset": torch.zeros(1), "bits": 4}  # fmt: skip
    args.update(kwargs)
    y, w, b = args.pop("y"), args.pop("weight"), args.pop("bias")
    with pytest.raises(exc, match=match):
        bn_act_quant(y, w, b, **args)


def test_opcheck_native_op():
    _require_cpu_kernel()
    y = h.to_layout(h.make_activation((4, 6, 3, 3), seed=9).float(), "channels_last").requires_grad_()
    gamma, beta, theta, offset, rm, rv, lo_hi = (t.float().requires_grad_() for t in _params(6, 9))
    op = torch.ops.bquant.native_bn_act_quant
    r = h.to_layout(h.make_activation((4, 6, 3, 3), seed=10).float(), "channels_last").requires_grad_()
    for args in [
        (y, gamma, beta, None, theta, offset, None, None, None, 1e-5, 2, 4, False, False),
        (y, gamma, beta, None, None, None, None, None, None, 1e-5, 1, 0, False, False),
        (y, gamma, beta, None, theta, offset, rm.detach(), rv.detach(), lo_hi.detach(), 1e-5, 0, 3, False, False),
        (y, gamma, beta, r, theta, offset, None, None, None, 1e-5, 2, 4, False, True),
        (y, gamma, beta, r, None, None, None, None, None, 1e-5, 0, 0, False, False),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_compiled_call_has_no_graph_breaks(backend):
    """One graph, forward and backward (the Python backends' kernels are opaque ops under torch.compile;
    tracing into Triton's launch code used to break the graph)."""
    _require_fused(backend) if backend != "reference" else None
    y = h.make_activation((4, 6, 3, 3), seed=4).float()
    gamma, beta, theta, offset, *_ = (t.float().requires_grad_() for t in _params(6, 4))

    r = h.make_activation((4, 6, 3, 3), seed=5).float().requires_grad_()

    def fn(y):
        out, kept = bn_act_quant(y, gamma, beta, act="h_swish", residual=r, theta=theta, offset=offset, bits=4,
                                 return_activation=True, backend=backend)  # fmt: skip
        return out * 2 + kept

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(y), fn(y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    params = (gamma, beta, theta, offset, r)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_ISA_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
import torch
import bquant_kernels.epilogue as E
outs = []
for y, w, b, th, of, g in torch.load(sys.argv[1]):
    for act in (None, "relu", "h_swish"):
        leaves = [t.clone().requires_grad_() for t in (y, w, b, th, of)]
        out = E.bn_act_quant(*leaves[:3], act=act, theta=leaves[3], offset=leaves[4], bits=4, backend="cpu")
        outs += [out.detach(), *torch.autograd.grad(out, leaves, g)]
torch.save(outs, sys.argv[2])
"""


def test_portable_and_avx2_instances_agree(tmp_path):
    """ATEN_CPU_CAPABILITY=default runs the baseline instance of the epilogue kernels: the same bits as
    the instance this process runs (AVX2 where the CPU has it). Inputs are made here: torch's own
    random generators differ between capabilities."""
    _require_cpu_kernel()
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for layout in ("contiguous", "channels_last"):
            y = h.to_layout(h.make_activation((16, 24, 6, 6), kind="shifted", seed=6).to(dtype), layout)
            gamma, beta, theta, offset, *_ = (t.float() for t in _params(24, 6))
            g = h.to_layout(h.make_activation((16, 24, 6, 6), seed=7).to(dtype), layout)
            cases.append((y, gamma, beta, theta, offset, g))
    # NaN in the 16-bit types: the vector conversions store c10's NaN (float16 0x7E00 with the sign, bfloat16 0x7FC0)
    for dtype in (torch.bfloat16, torch.float16):
        y = h.make_activation((16, 24, 6, 6), kind="shifted", seed=8).to(dtype)
        y[3, 5, 2, 1] = float("nan")
        y = y.contiguous(memory_format=torch.channels_last)
        gamma, beta, theta, offset, *_ = (t.float() for t in _params(24, 8))
        cases.append((y, gamma, beta, theta, offset, -torch.ones_like(y)))
    h.assert_cpu_instances_agree(_ISA_SCRIPT, cases, tmp_path)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
def test_one_element_parameters_of_any_shape(backend, shape):
    """theta and offset may have any one-element shape; their gradients come back in that shape (as for
    batchquant, issue 14), equal to the (1,)-shaped run's."""
    if backend == "cpu":
        _require_cpu_kernel()
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(4, 3, 5, 5, generator=gen)
    grad = torch.randn(4, 3, 5, 5, generator=gen)

    def run(param_shape):
        theta = torch.full(param_shape, 0.3, requires_grad=True)
        offset = torch.full(param_shape, 0.2, requires_grad=True)
        out = bn_act_quant(y, torch.ones(3), torch.zeros(3), act="relu", theta=theta, offset=offset, bits=4,
                           backend=backend)  # fmt: skip
        (out * grad).sum().backward()
        return out.detach(), theta.grad, offset.grad

    out, g_theta, g_offset = run(shape)
    ref_out, ref_theta, ref_offset = run((1,))
    assert g_theta.shape == shape and g_offset.shape == shape
    assert torch.equal(out, ref_out)
    assert torch.equal(g_theta.reshape(1), ref_theta) and torch.equal(g_offset.reshape(1), ref_offset)
