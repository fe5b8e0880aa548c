"""Loads the compiled extension ``bquant_kernels._C``; falls back to the reference backend without it."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch  # (loads libc10/libtorch, which _C links against)

# Must equal kApiVersion of csrc/bquant.h (bump both when an op changes); a build with another value is stale.
API_VERSION = 4

ext: ModuleType | None = None
unavailable_reason: str = ""

try:
    ext = importlib.import_module("bquant_kernels._C")
except ImportError as err:  # not built, or built against another torch
    unavailable_reason = f"the extension bquant_kernels._C could not be imported ({err})"
else:
    if getattr(ext, "API_VERSION", None) != API_VERSION:
        unavailable_reason = (
            f"the extension bquant_kernels._C is stale (API_VERSION "
            f"{getattr(ext, 'API_VERSION', None)}, expected {API_VERSION})"
        )
        ext = None

if ext is None:
    warnings.warn(
        f"bquant_kernels: {unavailable_reason}; using the slower 'reference' backend. "
        "Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_op(name: str) -> bool:
    """Whether the loaded extension registered the native op ``torch.ops.bquant.<name>``."""
    return ext is not None and hasattr(torch.ops.bquant, name)


def has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return ext is not None and bool(getattr(ext, "WITH_CUDA", False))
