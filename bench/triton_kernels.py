"""GPU time of the Triton kernels, launch overhead excluded, against the bytes they must move.

Each backend entry point is captured in a CUDA graph and replayed (``do_bench_cudagraph``), which
also proves it makes no host sync (a sync inside a capture fails). The forward is split into its
stages; "op" is the whole ``bquant_kernels.batchquant`` call with autograd, launches included.

    python bench/triton_kernels.py [--shapes 64x144x56x56 ...] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

import bquant_kernels as bk
from bquant_kernels.backends import triton as backend
from bquant_kernels.backends.triton import batchquant as kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _gpu_us(fn) -> float:
    fn()  # autotune and compile outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3


def _wall_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20) * 1e3


def bench_case(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> dict[str, float]:
    x = torch.randn(shape, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, C, inner = bk.ops.dense_activation(x)
    g = torch.randn_like(x)
    theta = torch.zeros(1, device="cuda")
    offset = torch.zeros(1, device="cuda")
    _, qp = backend.batchquant_forward(x, theta, offset, None, 4, False, C, inner)
    qp_out = torch.empty_like(qp)
    stages = {
        "range": lambda: kernels._range(x, C, inner, qp_out, theta, (0.0, 15.0)),
        "quant": lambda: backend.batchquant_forward(x, theta, offset, qp[:2], 4, False, C, inner),
        "fwd": lambda: backend.batchquant_forward(x, theta, offset, None, 4, False, C, inner),
        "bwd": lambda: backend.batchquant_backward(g, x, offset, qp, 4, False),
    }
    us = {name: _gpu_us(fn) for name, fn in stages.items()}
    xr = x.detach().requires_grad_(True)
    us["op fwd"] = _wall_us(lambda: bk.batchquant(xr, theta, offset, 4, backend="triton"))
    nbytes = x.numel() * x.element_size()
    us["fwd GB/s"] = 3 * nbytes / us["fwd"] * 1e-3  # x read twice, y written
    us["bwd GB/s"] = 3 * nbytes / us["bwd"] * 1e-3  # x and grad_y read, grad_x written
    return us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["64x144x56x56", "64x576x14x14", "64x1536"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=tuple(DTYPES))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | times in us")
    cols = ["range", "quant", "fwd", "bwd", "op fwd", "fwd GB/s", "bwd GB/s"]
    print(f"{'case':34}" + "".join(f"{c:>10}" for c in cols))
    for spec in args.shapes:
        shape = tuple(int(d) for d in spec.split("x"))
        for dtype in args.dtypes:
            for channels_last in (False, True) if len(shape) == 4 else (False,):
                us = bench_case(shape, DTYPES[dtype], channels_last)
                label = f"{spec} {dtype} {'channels_last' if channels_last else 'contiguous'}"
                print(f"{label:34}" + "".join(f"{us[c]:10.1f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
