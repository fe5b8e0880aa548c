"""Benchmark of the BatchQuant and LSQ fake-quantization ops.

Times, per shape, dtype and memory format, the forward and the forward+backward of

- ``eager``: the published QFA/BatchQuant formulation (``bench/eager_published.py``, host syncs included),
- ``reference``: ``bquant_kernels`` with ``backend="reference"`` (eager PyTorch, no host sync),
- ``compiled``: ``torch.compile`` of the spec written as autograd PyTorch (``bench/autograd_reference.py``;
  Inductor fuses the forward and the autograd-derived backward),
- every fused backend available here (``cpu``; ``cuda`` and ``triton`` on a GPU, never under the
  Triton interpreter).

"fwd" is the training forward (inputs require grad, autograd records); "fwd+bwd" adds
``torch.autograd.grad`` for every input. On the CPU the implementations of a case are timed in
turns (``bench.timing.time_cpu_interleaved``) so that ratios survive this shared machine's drifting
speed; on a GPU one after the other with ``triton.testing.do_bench``. GB/s counts the minimum bytes
moved: BatchQuant forward reads ``x`` twice (statistics, then quantization) and writes ``y``; LSQ
forward reads ``w`` once and writes ``w_hat``; every backward reads the input and the upstream
gradient and writes its gradient.

Usage::

    python bench/kernels.py [--device cpu|cuda] [--shapes 64x96x28x28 ...] [--dtypes fp32 bf16 fp16]
        [--memory-formats contiguous channels_last] [--lsq-shapes 576x96x1x1 ...] [--bits 4]
        [--no-compile] [--threads N] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bquant_kernels as bk  # noqa: E402
from bench.autograd_reference import batchquant_autograd, lsq_autograd  # noqa: E402
from bench.eager_published import batchquant_published, lsq_published  # noqa: E402
from bench.timing import time_cpu_interleaved, time_cuda_graph, time_fn  # noqa: E402
from bquant_kernels.backends import get_backend  # noqa: E402
from bquant_kernels.qparams import LN2, batchquant_grid, lsq_grid  # noqa: E402
from qfa.io import atomic_write_text  # noqa: E402

GPU_SHAPES = ("64x144x56x56", "64x96x28x28", "64x576x14x14", "64x24x14x14", "64x1536")
CPU_SHAPES = ("64x24x14x14", "64x1536", "64x96x28x28")
QUICK_SHAPES = ("64x24x14x14",)
LSQ_SHAPES = ("576x96x1x1", "576x1x7x7")  # a pointwise and a depthwise MobileNetV3 weight
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = ("contiguous", "channels_last")
FUSED_BACKENDS = ("cpu", "cuda", "triton")
PASSES = ("fwd", "fwd+bwd")
# Minimum bytes moved per element, in units of the element size.
ELEMENT_TRAFFIC = {"batchquant": {"fwd": 3, "fwd+bwd": 6}, "lsq": {"fwd": 2, "fwd+bwd": 5}}
# Timing budget per measurement (seconds).
TIMING = {
    "cpu": {"min_total_s": 0.25, "warmup_s": 0.05},
    "quick": {"min_total_s": 0.02, "warmup_s": 0.0, "min_reps": 3},
    "cuda": {"min_total_s": 0.1, "warmup_s": 0.025},  # do_bench's rep and warmup defaults
}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "batchquant" or "lsq"
    shape: tuple[int, ...]
    dtype: str
    memory_format: str

    @property
    def label(self) -> str:
        return f"{self.op} {format_shape(self.shape)} {self.dtype} {self.memory_format}"


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    memory_format: str
    impl: str
    pass_: str
    median_s: float | None = None
    graph_s: float | None = None  # CUDA only: replay of a captured CUDA graph (device time, no launch overhead)
    bytes: int = 0
    gbps: float | None = None
    graph_gbps: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compiled: float | None = None
    mismatch_fraction: float | None = None  # fraction of y more than half a step from the reference's
    error: str | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        return d


# ----------------------------------------------------------------------------- arguments


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64x96x28x28, got {text!r}") from None
    if not 2 <= len(shape) <= 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must have 2 to 4 positive sizes (N, C[, L | H, W]), got {text!r}")
    return shape


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible, else cpu")
    p.add_argument("--shapes", nargs="+", type=parse_shape, help="BatchQuant activation shapes")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default: fp32 bf16")
    p.add_argument(
        "--memory-formats", nargs="+", choices=MEMORY_FORMATS, help="4-D only; default: both on cuda, contiguous on cpu"
    )
    p.add_argument("--lsq-shapes", nargs="*", type=parse_shape, help=f"LSQ weights (default {' '.join(LSQ_SHAPES)})")
    p.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="{2..8}", help="bit-width (default 4)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="time torch.compile (default: on, off with --quick)"
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's default)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke run: one small shape, fp32, no compile (< 30 s on CPU)")
    return p


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the device-dependent defaults."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    on_gpu = args.device == "cuda"
    if args.shapes is None:
        defaults = QUICK_SHAPES if args.quick else GPU_SHAPES if on_gpu else CPU_SHAPES
        args.shapes = [parse_shape(s) for s in defaults]
    if args.dtypes is None:
        args.dtypes = ["fp32"] if args.quick else ["fp32", "bf16"]
    if args.memory_formats is None:
        args.memory_formats = list(MEMORY_FORMATS) if on_gpu and not args.quick else ["contiguous"]
    if args.lsq_shapes is None:
        args.lsq_shapes = [parse_shape(s) for s in LSQ_SHAPES[: 1 if args.quick else None]]
    if args.compile is None:
        args.compile = not args.quick
    return args


def build_cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            for fmt in args.memory_formats:
                if fmt == "channels_last" and len(shape) != 4:
                    continue  # only 4-D tensors have a channels_last format
                cases.append(Case("batchquant", shape, dtype, fmt))
    for shape in args.lsq_shapes:
        for dtype in args.dtypes:
            cases.append(Case("lsq", shape, dtype, "contiguous"))
    return cases


# ----------------------------------------------------------------------------- implementations

Impl = Callable[..., torch.Tensor]


def fused_backends(device: torch.device) -> tuple[dict[str, str], dict[str, str]]:
    """``(usable, skipped)``: fused backend names that run on ``device`` here, and why the others do not."""
    usable, skipped = {}, {}
    for name in FUSED_BACKENDS:
        ok, why = bk.backends()[name]
        if not ok:
            skipped[name] = why
        elif device.type not in get_backend(name).DEVICES:
            skipped[name] = f"does not run on {device.type}"
        elif name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            skipped[name] = "TRITON_INTERPRET=1: interpreter timings mean nothing"
        else:
            usable[name] = why
    return usable, skipped


def implementations(case: Case, bits: int, compile_: bool, fused: Sequence[str]) -> dict[str, Impl]:
    """The implementations to time for ``case``, by row name, in table order."""
    dtype = DTYPES[case.dtype]
    if case.op == "batchquant":
        impls: dict[str, Impl] = {
            "eager": lambda x, t, o: batchquant_published(x, t, o, bits),
            "reference": lambda x, t, o: bk.batchquant(x, t, o, bits, backend="reference"),
        }
        if compile_:
            impls["compiled"] = torch.compile(lambda x, t, o: batchquant_autograd(x, t, o, bits), dynamic=False)
        for name in fused:
            if dtype in get_backend(name).DTYPES:
                impls[name] = lambda x, t, o, name=name: bk.batchquant(x, t, o, bits, backend=name)
        return impls
    impls = {
        "eager": lambda w, s: lsq_published(w, s, bits),
        "reference": lambda w, s: bk.lsq(w, s, bits, backend="reference"),
    }
    if compile_:
        impls["compiled"] = torch.compile(lambda w, s: lsq_autograd(w, s, bits), dynamic=False)
    for name in fused:
        if dtype in get_backend(name).DTYPES:
            impls[name] = lambda w, s, name=name: bk.lsq(w, s, bits, backend=name)
    return impls


def make_inputs(case: Case, device: torch.device, bits: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, float]:
    """``(inputs, grad_out, step)``: leaf tensors that require grad, an upstream gradient, the quantization step."""
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[case.dtype]
    if case.op == "batchquant":
        C = case.shape[1]
        # Channels of very different ranges and a shifted mean, like MobileNetV3 activations.
        channel_scale = torch.logspace(-1, 1, C).view(1, C, *[1] * (len(case.shape) - 2))
        x = (torch.randn(case.shape, generator=gen) + 0.3) * channel_scale
        theta, offset = torch.tensor([0.25]), torch.tensor([0.1])
        dims = [d for d in range(x.dim()) if d != 1]
        lo, hi = x.amin(dim=dims).mean().clamp(max=0), x.amax(dim=dims).mean().clamp(min=0)
        qmin, qmax = batchquant_grid(bits, signed=False)
        step = float((hi - lo) / (qmax - qmin) / F.softplus(theta, beta=LN2))
        fmt = torch.channels_last if case.memory_format == "channels_last" else torch.contiguous_format
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        inputs = (x, theta.to(device), offset.to(device))
    else:
        w = 0.05 * torch.randn(case.shape, generator=gen)
        step_t = 2 * w.abs().mean() / math.sqrt(lsq_grid(bits, signed=True)[1])  # the spec's LSQ init
        step = float(step_t)
        inputs = (w.to(device=device, dtype=dtype), step_t.reshape(1).to(device))
    grad_out = torch.randn(inputs[0].shape, generator=gen).to(device=device, dtype=dtype)
    if case.memory_format == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    return tuple(t.requires_grad_() for t in inputs), grad_out, step


# ----------------------------------------------------------------------------- measuring


def timing_budget(device: torch.device, quick: bool) -> dict[str, float | int]:
    return TIMING["cuda" if device.type == "cuda" else "quick" if quick else "cpu"]


def run_case(case: Case, device: torch.device, args: argparse.Namespace, fused: Sequence[str]) -> list[Row]:
    torch.compiler.reset()  # each case compiles its own static graph; no recompile limit is reached
    inputs, grad_out, step = make_inputs(case, device, args.bits)
    impls = implementations(case, args.bits, args.compile, fused)
    timing = timing_budget(device, args.quick)
    nbytes = inputs[0].numel() * inputs[0].element_size()
    with torch.no_grad():
        y_ref = impls["reference"](*inputs).float()
    rows = []
    for impl, fn in impls.items():
        mismatch, error = None, None
        try:
            y = fn(*inputs).detach().float()
            mismatch = float(((y - y_ref).abs() > 0.5 * step).float().mean())
        except Exception as err:  # reported in the row and the exit status, the other rows still run
            error = f"{type(err).__name__}: {err}"
        for pass_ in PASSES:
            row = Row(case.op, format_shape(case.shape), case.dtype, case.memory_format, impl, pass_)
            row.bytes = ELEMENT_TRAFFIC[case.op][pass_] * nbytes
            row.mismatch_fraction, row.error = mismatch, error
            rows.append(row)
    for pass_ in PASSES:
        timed = {r.impl: r for r in rows if r.pass_ == pass_ and r.error is None}
        closures = {impl: _closure(impls[impl], pass_, inputs, grad_out) for impl in timed}
        for impl, seconds in _time_all(closures, device, timing).items():
            row = timed[impl]
            if isinstance(seconds, Exception):
                row.error = f"{type(seconds).__name__}: {seconds}"
                continue
            row.median_s = seconds
            row.gbps = row.bytes / seconds / 1e9
            # The published formulation syncs with the host (.item()), so it cannot be captured.
            if device.type == "cuda" and impl != "eager":
                try:
                    row.graph_s = time_cuda_graph(closures[impl], device=device, **timing)
                    row.graph_gbps = row.bytes / row.graph_s / 1e9
                except Exception as err:
                    row.error = f"CUDA graph: {type(err).__name__}: {err}"
    for row in rows:
        if row.error:
            print(f"ERROR {case.label} {row.impl} {row.pass_}: {row.error}", file=sys.stderr)
    _fill_speedups(rows)
    return rows


def _closure(
    fn: Callable, pass_: str, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor
) -> Callable[[], object]:
    if pass_ == "fwd":
        return lambda: fn(*inputs)
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)


def _time_all(
    closures: dict[str, Callable[[], object]], device: torch.device, timing: dict[str, float | int]
) -> dict[str, float | Exception]:
    """Median seconds per call of each closure (or the exception it raised).

    On the CPU the implementations are timed interleaved (``time_cpu_interleaved``), so that this
    shared machine's drifting speed affects them alike and their ratios hold; on a GPU one after the
    other with ``do_bench``.
    """
    out: dict[str, float | Exception] = {}
    if device.type == "cpu":
        working = {}
        for impl, fn in closures.items():
            try:
                fn()
                working[impl] = fn
            except Exception as err:
                out[impl] = err
        out.update(time_cpu_interleaved(working, **timing))
        return {impl: out[impl] for impl in closures}
    for impl, fn in closures.items():
        try:
            out[impl] = time_fn(fn, device=device, **timing)
        except Exception as err:
            out[impl] = err
    return out


def _fill_speedups(rows: list[Row]) -> None:
    for pass_ in PASSES:
        times = {r.impl: r.median_s for r in rows if r.pass_ == pass_}
        for r in rows:
            if r.pass_ != pass_ or r.median_s is None:
                continue
            if times.get("eager"):
                r.speedup_vs_eager = times["eager"] / r.median_s
            if times.get("compiled"):
                r.speedup_vs_compiled = times["compiled"] / r.median_s


def summarize(rows: list[Row]) -> dict[str, dict[str, dict[str, float]]]:
    """Geometric-mean speedups per implementation and pass, over the cases where both times exist."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for impl in dict.fromkeys(r.impl for r in rows):
        for pass_ in PASSES:
            picked = [r for r in rows if r.impl == impl and r.pass_ == pass_]
            for key in ("speedup_vs_eager", "speedup_vs_compiled"):
                values = [getattr(r, key) for r in picked if getattr(r, key)]
                if values:
                    geomean = math.exp(sum(math.log(v) for v in values) / len(values))
                    out.setdefault(impl, {}).setdefault(pass_, {})[key] = geomean
    return out


# ----------------------------------------------------------------------------- reporting


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, argv: Sequence[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/kernels.py", *argv]),
        "device": {"type": device.type, "name": device_name(device), "cpu_threads": torch.get_num_threads()},
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # CPU timings need an idle host
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "bquant": bk.__version__,
        "backends": {name: {"available": ok, "reason": why} for name, (ok, why) in bk.backends().items()},
    }


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


# (title, width) of the numeric columns of the table.
COLUMNS = (
    ("vs eager", 9),
    ("vs compiled", 12),
    ("median", 11),
    ("GB/s", 8),
    ("graph", 11),
    ("graph GB/s", 11),
    ("mismatch", 9),
)


def _table_line(impl: str, pass_: str, cells: Sequence[str]) -> str:
    return f"  {impl:<10} {pass_:<8} " + " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True))


def format_rows(rows: list[Row]) -> str:
    """The table of ``rows``, one block per case."""
    lines: list[str] = []
    current = None
    for r in rows:
        label = f"{r.op} {r.shape} {r.dtype} {r.memory_format}"
        if label != current:
            lines += ["", label, _table_line("impl", "pass", [title for title, _ in COLUMNS])]
            current = label
        if r.error:
            lines.append(f"  {r.impl:<10} {r.pass_:<8} ERROR {r.error}")
            continue
        cells = (
            _fmt_ratio(r.speedup_vs_eager),
            _fmt_ratio(r.speedup_vs_compiled),
            _fmt_time(r.median_s),
            "-" if r.gbps is None else f"{r.gbps:.1f}",
            _fmt_time(r.graph_s),
            "-" if r.graph_gbps is None else f"{r.graph_gbps:.1f}",
            "-" if r.mismatch_fraction is None else f"{r.mismatch_fraction:.1e}",
        )
        lines.append(_table_line(r.impl, r.pass_, cells))
    return "\n".join(lines)


def format_summary(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["", "geometric-mean speedup over all cases:"]
    for impl, passes in summary.items():
        for pass_, ratios in passes.items():
            parts = [f"{key.removeprefix('speedup_')} {value:.2f}x" for key, value in ratios.items()]
            lines.append(f"  {impl:<10} {pass_:<8} " + ", ".join(parts))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def write_report(path: Path, env: dict, args: argparse.Namespace, device: torch.device, rows: list[Row]) -> None:
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings["shapes"] = [format_shape(s) for s in settings["shapes"]]
    settings["lsq_shapes"] = [format_shape(s) for s in settings["lsq_shapes"]]
    settings["timing"] = timing_budget(device, args.quick)
    report = {**env, "settings": settings, "rows": [r.to_json() for r in rows], "summary": summarize(rows)}
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")  # rewritten after every case


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = resolve_args(parser.parse_args(argv), parser)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fused, skipped = fused_backends(device)
    env = environment(device, argv)
    print(
        f"{env['device']['name']} | torch {env['torch']} | bits {args.bits} | compile {args.compile} "
        f"| load average {env['load_average_1m']}"
    )
    for name, why in skipped.items():
        print(f"backend {name}: skipped ({why})")
    if device.type == "cpu":
        print(
            f"CPU run ({torch.get_num_threads()} thread(s)): absolute times are specific to this machine; "
            "read the speedups (time of eager or compiled / time of the row; > 1 is faster)."
        )
    rows: list[Row] = []
    for case in build_cases(args):
        case_rows = run_case(case, device, args, list(fused))
        print(format_rows(case_rows), flush=True)
        rows += case_rows
        if args.json is not None:  # after every case, so that an interrupted run keeps its results
            write_report(args.json, env, args, device, rows)
    print(format_summary(summarize(rows)))
    if args.json is not None:
        print(f"\nwrote {args.json}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
