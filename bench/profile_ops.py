"""Per-kernel device times of one BatchQuant forward+backward, from ``torch.profiler``.

Where ``bench/kernels.py`` gives one time per call, this splits it into the kernels each backend
launches (range, quantize, backward; or Inductor's fused kernels for the compiled reference), with
their share of the device-to-device copy roofline, to see which kernel falls short of it.

Usage::

    python bench/profile_ops.py [--shape 64x144x56x56] [--dtype fp32|bf16|fp16] [--channels-last]
        [--impls cuda triton compiled] [--reps 20]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bquant_kernels as bk  # noqa: E402
from bench.autograd_reference import batchquant_autograd  # noqa: E402
from bench.kernels import DTYPES, parse_shape  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=parse_shape("64x144x56x56"))
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--impls", nargs="+", default=["cuda", "triton", "compiled"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--bits", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.shape, device="cuda").to(DTYPES[args.dtype]).contiguous(memory_format=fmt)
    x.requires_grad_()
    theta = torch.tensor([0.25], device="cuda", requires_grad=True)
    offset = torch.tensor([0.1], device="cuda", requires_grad=True)
    grad = torch.randn_like(x)
    inputs = (x, theta, offset)
    nbytes = x.numel() * x.element_size()
    for impl in args.impls:
        if impl == "compiled":
            fn = torch.compile(lambda a, b, c: batchquant_autograd(a, b, c, args.bits), dynamic=False)
        elif bk.backends().get(impl, (False, ""))[0]:
            fn = lambda a, b, c, impl=impl: bk.batchquant(a, b, c, args.bits, backend=impl)  # noqa: E731
        else:
            print(f"{impl}: unavailable: {bk.backends().get(impl, (False, 'unknown'))[1]}")
            continue
        for _ in range(3):
            torch.autograd.grad(fn(*inputs), inputs, grad)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                torch.autograd.grad(fn(*inputs), inputs, grad)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        events.sort(key=lambda e: -e.device_time_total)
        total_us = sum(e.device_time_total for e in events) / args.reps
        label = f"{format(impl)} {'x'.join(map(str, args.shape))} {args.dtype}"
        label += " channels_last" if args.channels_last else ""
        # Minimum traffic of forward+backward: read x twice and write y; read x and grad_y, write grad_x.
        print(f"\n{label}: device time {total_us:.1f} us per fwd+bwd = {6 * nbytes / total_us / 1e3:.0f} GB/s")
        for e in events:
            per_call = e.device_time_total / args.reps
            print(f"  {per_call:9.1f} us  x{e.count // args.reps:<3d} {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
