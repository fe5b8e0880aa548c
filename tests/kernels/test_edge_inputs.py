"""Edge inputs every backend must treat alike (issue 14): lsq_multi entries on the wrong device or of the
wrong dtype, one-element parameters of any shape, and +-inf in the activations (spec 1.7)."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKEND_DEVICES, make_activation, require

import bquant_kernels as bk

backend_devices = pytest.mark.parametrize(
    "backend,device", BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES]
)


# ----------------------------------------------------------------------------- lsq_multi entries


@backend_devices
def test_lsq_multi_checks_every_entry_before_a_kernel_runs(backend, device):
    """A step on another device (meta: no data at all) or of an integer dtype, or a weight of another
    dtype, is an error naming the list and index on every backend, not uninitialised output."""
    require(backend, device, torch.float32)
    w = [torch.randn(4, 4, device=device), torch.randn(3, device=device)]
    s = [torch.tensor([0.1], device=device), torch.tensor([0.2], device=device)]
    with pytest.raises(ValueError, match=rf"steps\[0\] is on meta but weights\[0\] is on {device}"):
        bk.lsq_multi(w[:1], [torch.tensor([0.1], device="meta")], [2], backend=backend)
    if device != "cpu":  # a CPU step with a CUDA weight
        with pytest.raises(ValueError, match=rf"steps\[1\] is on cpu but weights\[1\] is on {device}"):
            bk.lsq_multi(w, [s[0], torch.tensor([0.2])], 4, backend=backend)
    with pytest.raises(TypeError, match=r"steps\[1\] must be a floating tensor"):
        bk.lsq_multi(w, [s[0], torch.tensor([1], device=device)], 4, backend=backend)
    with pytest.raises(ValueError, match=r"steps\[1\] must have exactly 1 element"):
        bk.lsq_multi(w, [s[0], torch.ones(2, device=device)], 4, backend=backend)
    with pytest.raises(ValueError, match=r"weights must share one device and dtype: weights\[1\]"):
        bk.lsq_multi([w[0], w[1].double()], s, 4, backend=backend)
    with pytest.raises(ValueError, match=r"weights must share one device and dtype: weights\[1\]"):
        bk.lsq_multi([w[0], w[1].to("meta")], s, 4, backend=backend)
    with pytest.raises(TypeError, match=r"weights\[1\] must be a floating tensor"):
        bk.lsq_multi([w[0], torch.ones(3, dtype=torch.int32, device=device)], s, 4, backend=backend)


def test_lsq_multi_meta_step_with_the_default_backend():
    """The case of the issue, on the default backend (cpu when the extension is built)."""
    with pytest.raises(ValueError, match=r"steps\[0\] is on meta but weights\[0\] is on cpu"):
        bk.lsq_multi([torch.randn(4, 4)], [torch.tensor([0.1], device="meta")], [2])


# ----------------------------------------------------------------------------- parameter shapes


@backend_devices
@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)], ids=str)
def test_one_element_parameters_of_any_shape(backend, device, shape):
    """theta, offset and LSQ steps may have any one-element shape; their gradients have that shape and
    the values of the [1]-shaped parameters, forward and backward, in lsq, batchquant and lsq_multi."""
    require(backend, device, torch.float32)
    x0 = make_activation((2, 3, 4, 5)).float().to(device)
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)).to(device)
    runs = {}
    for pshape in ((1,), shape):
        x = x0.clone().requires_grad_(True)
        t = torch.full(pshape, 0.3, device=device, requires_grad=True)
        o = torch.full(pshape, -0.2, device=device, requires_grad=True)
        s = torch.full(pshape, 0.15, device=device, requires_grad=True)
        s2 = torch.full(pshape, 0.25, device=device, requires_grad=True)
        w = x0.clone().requires_grad_(True)
        y = bk.batchquant(x, t, o, 4, backend=backend)
        w_hat = bk.lsq(w, s, 3, backend=backend)
        (m1, m2) = bk.lsq_multi([w, x0[0]], [s2, s], [4, 2], backend=backend)
        torch.autograd.backward((y, w_hat, m1, m2), (g, g, g, g[0]))
        for p in (t, o, s, s2):
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
        runs[pshape] = [y, w_hat, m1, m2, x.grad, w.grad] + [p.grad.reshape(1) for p in (t, o, s, s2)]
    for a, b in zip(runs[(1,)], runs[shape], strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- +-inf (spec 1.7)


def _quantize(backend, x, g, lo_hi):
    x = x.clone().requires_grad_(True)
    t = torch.tensor([0.3], device=x.device, requires_grad=True)
    o = torch.tensor([-0.2], device=x.device, requires_grad=True)
    y, used = bk.batchquant(x, t, o, 4, lo_hi=lo_hi, return_range=True, backend=backend)
    y.backward(g)
    return y, used, x.grad, t.grad, o.grad


@backend_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("where", ["-inf", "+inf", "both"])
@pytest.mark.parametrize("eval_mode", [False, True], ids=["batch-range", "lo_hi"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_infinite_inputs_match_the_reference(backend, device, dtype, where, eval_mode):
    """x holding +-inf (float16: an overflow upstream): spec 1.7. With the batch range
    S is infinite, y and grad_theta are not finite and grad_offset is NaN (not the +-inf of a factored sum),
    whatever the signs of the upstream gradient; with a stored finite range only the infinite elements
    are clipped. Every output equals the reference backend's (NaN where it is NaN)."""
    require(backend, device, dtype)
    x = make_activation((2, 3, 4, 5), seed=4).to(dtype).to(device)
    if where in ("-inf", "both"):
        x[0, 1, 2, 3] = float("-inf")
    if where in ("+inf", "both"):
        x[1, 2, 0, 1] = float("inf")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)  # mixed signs
    lo_hi = torch.tensor([-1.0, 2.0], device=device) if eval_mode else None
    got = _quantize(backend, x, g, lo_hi)
    want = _quantize("reference", x.cpu(), g.cpu(), None if lo_hi is None else lo_hi.cpu())
    names = ("y", "range", "grad_x", "grad_theta", "grad_offset")
    for name, a, b in zip(names, got, want, strict=True):
        a, b = a.detach().cpu().double(), b.detach().double()
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN where the reference has none, or not"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True, msg=f"{name} differs")
    if not eval_mode:
        assert not torch.isfinite(got[0]).any() and not torch.isfinite(got[3]) and torch.isnan(got[4])
