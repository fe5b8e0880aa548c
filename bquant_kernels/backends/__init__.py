"""Backend registry, selection, and the backend contract.

Two kinds of backend (``bquant_kernels/ops.py`` says which route each takes):

- The compiled backends ``cpu`` and ``cuda`` (``NATIVE``) are the native ops ``torch.ops.bquant.native_*``
  of ``csrc/ops.cpp``; their modules here only report ``available()``, ``DTYPES`` and ``DEVICES``.
- The Python backends ``reference`` and ``triton`` are modules with, besides those three, the functions
  named in ``FUNCTIONS``, all taking tensors already validated and laid out by ``bquant_kernels.ops``
  (``x`` dense, either contiguous or channels_last, viewed as ``(outer, C, inner)`` in memory so that
  element ``i`` belongs to channel ``(i // inner) % C``; parameters with one element, of any shape):

  - ``batch_range(x, C, inner) -> float32[2]``
  - ``batchquant_forward(x, theta, offset, lo_hi | None, bits, signed, C, inner) -> (y, qparams)``
    (``y`` with the strides of ``x``; ``qparams`` per ``bquant_kernels.qparams``)
  - ``batchquant_backward(grad_y, x, offset, qparams, bits, signed) -> (grad_x, grad_theta[1], grad_offset[1])``
    (``grad_y`` has the strides of ``x``; scalar gradients in the dtype of ``qparams``)
  - ``lsq_forward(w, step, bits, signed) -> w_hat``
  - ``lsq_backward(grad, w, step, bits, signed, numel_full) -> (grad_w, grad_step[1])``

  The native ops ``native_batch_range``, ``native_batchquant_fwd``/``_bwd`` and ``native_lsq_fwd``/``_bwd``
  are the same five functions for the compiled backends, with the layout handling inside (no ``C``,
  ``inner``; ``native_lsq_fwd`` also takes ``numel_full``).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .. import extension

NAMES = ("reference", "cpu", "triton", "cuda")
NATIVE = ("cpu", "cuda")  # the compiled backends: csrc/, behind torch.ops.bquant.native_*
FUNCTIONS = ("batch_range", "batchquant_forward", "batchquant_backward", "lsq_forward", "lsq_backward")
# Default preference per device type, fastest first (see README, "Backends").
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def get_backend(name: str) -> ModuleType:
    """The module of backend ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def backends() -> dict[str, tuple[bool, str]]:
    """Every backend with ``(available, reason)``."""
    return {name: get_backend(name).available() for name in NAMES}


_RESOLVED: dict[tuple[str | None, str, torch.dtype], str] = {}


@torch.compiler.assume_constant_result
def resolve(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend name to use for a tensor on ``device``: explicit, else ``BQUANT_BACKEND``, else the default.

    Cached per (request, device type, dtype): it runs on every op call. Under ``torch.compile`` it is
    evaluated once at trace time.
    """
    requested = backend or os.environ.get("BQUANT_BACKEND") or None
    key = (requested, device.type, dtype)
    name = _RESOLVED.get(key)
    if name is None:
        if backend is None and requested is not None and requested not in NAMES:
            raise ValueError(f"environment variable BQUANT_BACKEND={requested!r}: use one of {NAMES}, or unset it")
        name = _RESOLVED[key] = _resolve_uncached(requested, device, dtype)
    return name


def kernel_backend(backend: str | None, x: torch.Tensor, native_op: str) -> str:
    """The implementation an op with C++ (``cpu``) and Triton kernels but no CUDA C++ one (the fused
    epilogue, the gated BatchQuant) runs for ``x`` on the BatchQuant ``backend``: ``cpu`` where the
    extension has ``native_op``, else the reference; on ``cuda`` Triton's where triton runs on ``x``, else
    the reference; ``triton`` and ``reference`` as they are."""
    name = resolve(backend, x.device, x.dtype)
    if name == "cpu":
        return "cpu" if extension.has_op(native_op) else "reference"
    if name == "cuda":
        triton = get_backend("triton")
        ok = x.device.type in triton.DEVICES and x.dtype in triton.DTYPES and triton.available()[0]
        return "triton" if ok else "reference"
    return name


def _resolve_uncached(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if requested is None:
        for name in _PREFERENCE.get(device.type, ("reference",)):
            mod = get_backend(name)
            if device.type in mod.DEVICES and dtype in mod.DTYPES and mod.available()[0]:
                return name
        return "reference"
    mod = get_backend(requested)
    ok, why = mod.available()
    if not ok:
        raise RuntimeError(f"backend={requested!r} is not available: {why}")
    if device.type not in mod.DEVICES:
        raise ValueError(f"backend={requested!r} does not run on {device.type} tensors (runs on {mod.DEVICES})")
    if dtype not in mod.DTYPES:
        raise TypeError(f"backend={requested!r} does not support dtype {dtype}; supported: {mod.DTYPES}")
    return requested
