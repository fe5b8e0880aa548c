"""Data-parallel scaling of the ``qfa train`` step: the step time with 1, 2, ... processes
(``torchrun --standalone``, gloo on the CPU, NCCL on GPUs), as scaling efficiency.

Each process trains on its own batch of ``--batch-size`` (the per-process batch of ``qfa train``), so
ideal scaling keeps the step time constant: efficiency(N) = t(1) / t(N), throughput N x batch / t(N).
The step is ``bench/train_step.py``'s (same subnets every run, an untimed pass first); with N > 1 it
runs through DDP (gradients all-reduced after the last subnet) and includes the loss all-reduce.
``independent`` rows run the same N processes without a process group (each trains alone): their
slowdown against 1 process is the machine's (shared cores, memory bandwidth), and a DDP row's
``sync_share`` = 1 - t(independent) / t(DDP) is the part of its step time that the gradient and loss
all-reduces add. Runs are made in alternating order ``--repeats`` times (1 2 2 1 ...) and each
keeps its fastest repeat (the median step of a repeat): on a shared machine the slowest samples measure the
neighbours, not the run. On the CPU every process uses ``--threads`` intra-op threads (default 1), so
N processes need N free cores.

Usage::

    python bench/scaling.py [--procs 1 2] [--device cpu|cuda] [--variant cpu] [--batch-size 32]
        [--resolutions 24:32:4] [--width-mult 0.5] [--subnets 4] [--steps 4] [--repeats 2] [--channels-last]
        [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.train_step import DEFAULT_RESOLUTIONS, run_variant, write_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """One process of a ``torchrun`` launch: time the steps; rank 0 prints the result as JSON.
    ``--alone``: no process group, each process trains by itself (what the machine alone costs)."""
    from qfa.train import distributed

    if args.alone:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        ctx = distributed.DistContext(local_rank=local_rank, device=distributed.pick_device(args.device, local_rank))
        main_process = os.environ.get("RANK", "0") == "0"
    else:
        ctx = distributed.setup(args.device)
        main_process = ctx.is_main
    try:
        result = run_variant(args.variant, args, ctx)
    finally:
        distributed.teardown()
    if main_process:
        print(json.dumps(result))


def launch(procs: int, args: argparse.Namespace, timeout_s: float, independent: bool = False) -> dict:
    """``torchrun --standalone --nproc-per-node procs`` of :func:`worker`; rank 0's result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           __file__, "--worker", *_step_flags(args), *(["--alone"] if independent else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{procs} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _step_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--variant", args.variant, "--batch-size", str(args.batch_size),
            "--resolutions", args.resolutions, "--width-mult", str(args.width_mult), "--subnets", str(args.subnets),
            "--steps", str(args.steps), "--threads", str(args.threads),
            "--channels-last" if args.channels_last else "--no-channels-last"]  # fmt: skip


def summarise(samples: dict[tuple[int, str], list[dict]], batch_size: int) -> list[dict]:
    """Per (process count, mode): the fastest repeat's median step, throughput and efficiency against
    1 process."""
    rows = []
    for n, mode in sorted(samples):
        best = min(samples[n, mode], key=lambda r: r["ms_median"])
        rows.append({
            "procs": n, "mode": mode, "ms_median": best["ms_median"], "ms_per_step": best["ms_per_step"],
            "repeat_medians_ms": [round(r["ms_median"], 3) for r in samples[n, mode]],
            "images_per_s": 1e3 * n * batch_size / best["ms_median"],
        })  # fmt: skip
    base = next((r for r in rows if r["procs"] == 1), None)
    alone = {r["procs"]: r["ms_median"] for r in rows if r["mode"] == "independent"}
    for r in rows:
        r["efficiency"] = base["ms_median"] / r["ms_median"] if base else None
        if r["mode"] == "ddp" and r["procs"] in alone:  # the step time that only the communication explains
            r["sync_share"] = 1.0 - alone[r["procs"]] / r["ms_median"]
    return rows


def format_rows(rows: list[dict], title: str) -> str:
    head = f"{'procs':>5} {'mode':<12} {'ms/step':>10} {'images/s':>10} {'efficiency':>10} {'sync':>6}  repeats (ms)"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        sync = f"{r['sync_share']:.0%}" if "sync_share" in r else "-"
        lines.append(f"{r['procs']:>5} {r['mode']:<12} {r['ms_median']:>10.1f} {r['images_per_s']:>10.1f} {eff:>10} "
                     f"{sync:>6}  {' '.join(f'{m:.0f}' for m in r['repeat_medians_ms'])}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=None, help="process counts (default: 1 2, or 1..GPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--variant", default=None, help="bench/train_step.py variant (default: the fused backend)")
    p.add_argument("--batch-size", type=int, default=32, help="images per process")
    p.add_argument("--resolutions", default=None, help="MIN:MAX:STEP (default: 128:224:4 on GPU, 24:32:4 on CPU)")
    p.add_argument("--width-mult", type=float, default=0.5)
    p.add_argument("--subnets", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (after as many untimed ones)")
    p.add_argument("--repeats", type=int, default=2, help="runs per process count, in alternating order")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads per process")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--independent", action=argparse.BooleanOptionalAction, default=True,
                   help="also run N processes without a process group (no communication): what the machine "
                   "alone costs (default: on)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dev = torch.device(args.device).type
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.variant = args.variant or dev
    args.resolutions = args.resolutions or DEFAULT_RESOLUTIONS[dev]
    args.procs = args.procs or ([1, 2] if dev == "cpu" else list(range(1, torch.cuda.device_count() + 1)))
    if args.worker:  # what bench/train_step.run_variant reads besides the flags above
        args.amp, args.flush_denormal = "none", False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    dev = torch.device(args.device).type
    runs = [(n, "ddp" if n > 1 else "single") for n in args.procs] + [
        (n, "independent") for n in args.procs if n > 1 and args.independent
    ]
    samples: dict[tuple[int, str], list[dict]] = {run: [] for run in runs}
    for rep in range(args.repeats):
        for n, mode in runs if rep % 2 == 0 else reversed(runs):
            samples[n, mode].append(launch(n, args, args.timeout, independent=mode == "independent"))
            ms = samples[n, mode][-1]["ms_median"]
            print(f"  {n} process(es), {mode}: {ms:.1f} ms/step", file=sys.stderr, flush=True)
    rows = summarise(samples, args.batch_size)
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    title = (
        f"data-parallel step ({args.variant}): {args.subnets} subnets, batch {args.batch_size}/process, "
        f"resolutions {args.resolutions}, width {args.width_mult}; {dev} ({name}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}" + (f", {args.threads} thread(s)/process" if dev == "cpu" else "")
    )
    print(format_rows(rows, title))
    if args.json:
        command = shlex.join([Path(sys.executable).name, *sys.argv])
        write_record(args.json, "ddp_scaling", args, dev, name, rows, cpu_count=os.cpu_count(), command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
