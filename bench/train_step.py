"""Benchmark of one supernet training step: the step of ``qfa train`` (``Trainer.train_step``).

One step = 6 subnets (min at the smallest resolution, max at the largest, 4 random ones at random
resolutions) on one synthetic batch, each with its in-place distillation teacher forward, its
forward and backward, then the gradient clipping and the SGD step. Variants:

- ``fp``: the supernet with every bit-width 32 (no quantizer runs): the floor;
- ``eager``: quantized (bits 2, 3, 4) with the published eager BatchQuant/LSQ
  (``bench/eager_published.py``, host syncs included) patched into every quantizer;
- ``reference`` (only when asked for), ``cpu``, ``cuda``, ``triton``: quantized with that
  ``bquant_kernels`` backend, for every fused backend available on the device (Triton is skipped
  under its CPU interpreter).

Every variant trains the same subnets (plans are seeded by the step index): one untimed pass over
the plans compiles and allocates, the timed pass runs the same plans again. Peak memory: the CUDA
allocator's peak during the timed pass; on the CPU the peak RSS of the variant's own process (each
CPU variant runs in a fresh subprocess).

Usage::

    python bench/train_step.py [--device cpu|cuda] [--batch-size 64] [--resolutions 24:32:4]
        [--width-mult 1.2] [--subnets 6] [--steps N] [--variants fp eager cpu ...]
        [--amp none|bf16] [--channels-last] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bquant_kernels as bk  # noqa: E402
from bquant_kernels.backends import get_backend  # noqa: E402
from qfa.io import atomic_write_text  # noqa: E402

FUSED = ("cpu", "cuda", "triton")
QUANT_BITS = (2, 3, 4)  # phase 1: every subnet is quantized
DEFAULT_RESOLUTIONS = {"cuda": "128:224:4", "cpu": "24:32:4"}


def available_variants(device: str, with_reference: bool = False) -> list[str]:
    """``fp``, ``eager``, then every fused backend that runs on ``device`` here."""
    out = ["fp", "eager"] + (["reference"] if with_reference else [])
    for name, (ok, _why) in bk.backends().items():
        if name not in FUSED or not ok:
            continue
        if device not in get_backend(name).DEVICES:
            continue
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            continue  # the interpreter is a correctness tool, not a speed
        out.append(name)
    return out


# ----------------------------------------------------------------------------- eager patch


def patch_eager() -> None:
    """Route every quantizer's training-mode op through the published eager functions."""
    import bquant_kernels.modules as modules
    from bench.eager_published import batchquant_published, lsq_published

    fused_batchquant = modules.batchquant

    def batchquant(x, theta, offset, bits, *, signed=False, lo_hi=None, return_range=False, backend=None):
        if lo_hi is not None or return_range:  # evaluation / recalibration: not part of the step
            return fused_batchquant(
                x, theta, offset, bits, signed=signed, lo_hi=lo_hi, return_range=return_range, backend=backend
            )
        return batchquant_published(x, theta, offset, bits, signed=signed)

    def lsq(w, step, bits, *, signed=True, numel_full=None, backend=None):
        return lsq_published(w, step, bits, signed=signed, numel_full=numel_full)

    def lsq_multi(weights, steps, bits, *, signed=True, numel_full=None, backend=None):
        fulls = numel_full or [w.numel() for w in weights]
        per_weight = zip(weights, steps, bits, fulls, strict=True)
        return [lsq(w, s, b, signed=signed, numel_full=n) for w, s, b, n in per_weight]

    modules.batchquant = batchquant
    modules.lsq = lsq
    modules.lsq_multi = lsq_multi  # the supernet quantizes its weights through lsq_quantize_weights


# ----------------------------------------------------------------------------- one variant


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(variant: str, args: argparse.Namespace, ctx=None) -> dict:
    """Time ``args.steps`` training steps of ``variant``; a result dict. ``ctx``: this process's
    :class:`~qfa.train.distributed.DistContext` when data-parallel (``bench/scaling.py``), else one process."""
    from qfa.train import distributed, options
    from qfa.train.trainer import Trainer

    device = torch.device(args.device) if ctx is None else ctx.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if variant == "eager":
        patch_eager()
    quantized = variant != "fp"
    backend = variant if variant in FUSED + ("reference",) else None
    settings = {
        "data": "synthetic", "batch_size": args.batch_size, "resolutions": args.resolutions,
        "width_mult": args.width_mult, "subnets": args.subnets, "bits": QUANT_BITS if quantized else (32,),
        "backend": backend, "amp": args.amp, "channels_last": args.channels_last, "progress": False,
        "resume": "none", "out": tempfile.mkdtemp(prefix="qfa-bench-"), "calib_batches": 1,
        # the published code runs BN, activation and its quantizers one by one (no fused epilogue)
        "fused_epilogue": variant != "eager",
    }  # fmt: skip
    opts = options.resolve(options.TrainOptions, settings)
    trainer = Trainer(opts, ctx or distributed.DistContext(device=device), log=lambda s: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    res = opts.max_resolution
    images = torch.randn(args.batch_size, 3, res, res, generator=gen).to(device)
    labels = torch.randint(0, trainer.n_classes, (args.batch_size,), generator=gen).to(device)
    plans = range(1000, 1000 + args.steps)  # the same subnets for every variant

    def one_pass() -> list[float]:
        times = []
        for s in plans:
            trainer.step = s
            _sync(device)
            t0 = time.perf_counter()
            trainer.train_step(images, labels)
            _sync(device)
            times.append(time.perf_counter() - t0)
        trainer.guard.flush()
        return times

    one_pass()  # compiles, autotunes, allocates, initialises every LSQ step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = one_pass()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "variant": variant,
        "backend": backend or ("eager published" if variant == "eager" else "default"),
        "bits": list(opts.bits),
        "ms_mean": 1e3 * statistics.fmean(times),
        "ms_median": 1e3 * statistics.median(times),
        "ms_min": 1e3 * min(times),
        "ms_per_step": [round(1e3 * t, 3) for t in times],
        "peak_mem_mb": peak / 2**20,
        "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


def run_isolated(variant: str, args: argparse.Namespace) -> dict:
    """``run_variant`` in a fresh interpreter (own peak RSS, no patched modules leaking)."""
    cmd = [sys.executable, __file__, "--worker", variant, "--device", args.device, "--batch-size", str(args.batch_size),
           "--resolutions", args.resolutions, "--width-mult", str(args.width_mult), "--subnets", str(args.subnets),
           "--steps", str(args.steps), "--amp", args.amp, "--threads", str(args.threads or 0)]  # fmt: skip
    if args.channels_last:
        cmd.append("--channels-last")
    if args.flush_denormal:
        cmd.append("--flush-denormal")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def add_ratios(results: list[dict]) -> None:
    by = {r["variant"]: r for r in results}
    for r in results:
        if "eager" in by:
            r["speedup_vs_eager"] = by["eager"]["ms_mean"] / r["ms_mean"]
        if "fp" in by:
            r["cost_vs_fp"] = r["ms_mean"] / by["fp"]["ms_mean"]


def format_results(results: list[dict], title: str) -> str:
    head = f"{'variant':<10} {'backend':<16} {'ms/step':>10} {'median':>10} {'x eager':>8} {'/ fp':>6} {'peak MB':>9}"
    lines = [title, head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['variant']:<10} {r['backend']:<16} {r['ms_mean']:>10.1f} {r['ms_median']:>10.1f} "
            f"{r.get('speedup_vs_eager', float('nan')):>8.2f} {r.get('cost_vs_fp', float('nan')):>6.2f} "
            f"{r['peak_mem_mb']:>9.0f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolutions", default=None, help="MIN:MAX:STEP (default: 128:224:4 on GPU, 24:32:4 on CPU)")
    p.add_argument("--width-mult", type=float, default=1.2)
    p.add_argument("--subnets", type=int, default=6)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 3 on GPU, 2 on CPU)")
    p.add_argument("--variants", nargs="+", default=None, help="default: fp, eager and every fused backend here")
    p.add_argument("--reference", action="store_true", help="also time the (unfused) reference backend")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--flush-denormal",
        action="store_true",
        help="CPU: treat denormal floats as zero (they slowed the full-precision step by 30-40%% on this x86 VM)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each variant in its own process (default: on the CPU, for per-variant peak RSS)")  # fmt: skip
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dev = torch.device(args.device).type
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.resolutions = args.resolutions or DEFAULT_RESOLUTIONS[dev]
    args.steps = args.steps or (3 if dev == "cuda" else 2)
    args.isolate = (dev == "cpu") if args.isolate is None else args.isolate
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_variant(args.worker, args)))
        return 0
    dev = torch.device(args.device).type
    variants = args.variants or available_variants(dev, args.reference)
    if args.variants is None and dev == "cpu" and "cpu" not in variants:
        print(f"note: the fused cpu backend is unavailable ({bk.backends()['cpu'][1]})", file=sys.stderr)
    if not args.isolate:  # the eager patch is process-wide: run it last
        variants = [v for v in variants if v != "eager"] + [v for v in variants if v == "eager"]
    results = []
    for v in variants:
        results.append(run_isolated(v, args) if args.isolate else run_variant(v, args))
        print(f"  {v}: {results[-1]['ms_mean']:.1f} ms/step", file=sys.stderr, flush=True)
    add_ratios(results)
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    title = (
        f"one training step: {args.subnets} subnets, batch {args.batch_size}, resolutions {args.resolutions}, "
        f"width {args.width_mult}, amp {args.amp}{', channels_last' if args.channels_last else ''}; "
        f"{dev} ({name}), torch {torch.__version__}"
        + (f", {args.threads or torch.get_num_threads()} threads" if dev == "cpu" else "")
    )
    print(format_results(results, title))
    if args.json:
        write_record(args.json, "train_step", args, dev, name, results)
    return 0


def write_record(path: str, benchmark: str, args: argparse.Namespace, device: str, name: str, results, **extra) -> None:
    """The JSON result file of a benchmark: what, when, where, with which settings (atomically written)."""
    record = {
        "benchmark": benchmark,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        **extra,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
        "results": results,
    }
    atomic_write_text(path, json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
