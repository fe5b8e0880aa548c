"""Shared wrapper for the compiled backends (``cpu`` and ``cuda``): the functions of ``_C`` with a prefix."""

from __future__ import annotations

from collections.abc import Callable

from .. import _ext


def bind(prefix: str) -> dict[str, Callable]:
    names = ("batch_range", "batchquant_forward", "batchquant_backward", "lsq_forward", "lsq_backward")

    def missing(*_args, **_kwargs):
        raise RuntimeError(f"bquant_kernels._C has no {prefix} kernels: {_ext.unavailable_reason}")

    if _ext.ext is None:
        return dict.fromkeys(names, missing)
    return {name: getattr(_ext.ext, f"{prefix}_{name}", missing) for name in names}
