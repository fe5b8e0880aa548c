"""Fused layer epilogue (BN + activation + next BatchQuant, ``model.fused_epilogue``) against separate ops.

Measures, fused and unfused side by side in one process:

- dispatched top-level ops (``torch.profiler`` events without a parent: operators called from Python
  and autograd's per-node evaluations) of one forward + backward of the max subnet, at W4A4 and in
  full precision (width 1.2, batch 8, 32 px, as counted in the issue), with the most frequent ones;
- one supernet training step (``Trainer.train_step``: 6 subnets with in-place distillation): wall
  time (interleaved steps, min and median), and the profiler's time of the BN, activation, shortcut add,
  SE gate multiply and BatchQuant ops (the top-level forward ops and backward nodes, each with what it dispatches: CPU
  time, and on a GPU the time of the kernels they launch; min over interleaved profiled steps)
  against that of the fused op; on a GPU, the allocator's peak during each variant's steps above
  what was allocated when the step began (both trainers stay resident);
- bytes of the tensors autograd saves for backward in one max-subnet forward at the step's batch
  size (what the fused op keeps alive: ``y`` and per-channel statistics, not BN's and the
  activation's outputs);
- per call, at one shape per stage of the supernet (expanded channels at input / 2 ... input / 32,
  the step's batch size), at two project convs' outputs with their shortcut (the sum handed on), and
  at the SE blocks' outputs (``gated_batchquant``: SE's gate multiply + the quantizer, act ``se_gate``):
  forward + backward of the fused op against the separate ops (samples interleaved on the CPU), and
  the fused op's time against the memory roofline: its floor traffic (forward 2 reads + 1 write,
  backward 4 reads + 1 write of the activation; 5 more with a shortcut) at the bandwidth of a copy of
  the same tensor.

Both trainers use one quantizer backend (``--backend``): the supernet fuses only where the epilogue
runs that backend's own kernels, so on a GPU the comparison is ``triton`` fused against ``triton``
unfused (the ``cuda`` backend keeps the separate ops, docs/known-issues.md). The op counts are of
the CPU model on the ``cpu`` backend whatever the device.

Usage::

    python bench/epilogue.py [--device cpu|cuda] [--backend cpu|triton|...] [--threads 1]
        [--batch-size 64] [--resolutions 24:32:4] [--steps 3] [--channels-last] [--amp none|bf16|fp16]
        [--skip-step] [--skip-calls] [--json PATH]
    python bench/epilogue.py --device cuda --resolutions 224:224:1 --steps 2    # the GPU setting
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.timing import time_cpu_interleaved, time_fn  # noqa: E402
from bquant_kernels import batchquant  # noqa: E402
from bquant_kernels.epilogue import bn_act_quant  # noqa: E402
from bquant_kernels.gated import gated_batchquant  # noqa: E402
from qfa import QFAMobileNetV3  # noqa: E402
from qfa.data import parse_resolutions  # noqa: E402
from qfa.io import atomic_write_text  # noqa: E402
from qfa.train.trainer import AMP_DTYPES  # noqa: E402

# Profiler names of the ops the fused ops replace (forward and backward: BN, activations, the shortcut
# adds, SE's gate multiplies, BatchQuant), and of the fused ops (the epilogue, the gated BatchQuant).
EPILOGUE_OPS = (
    "aten::batch_norm", "NativeBatchNormBackward0", "aten::relu", "ReluBackward0", "aten::hardswish",
    "HardswishBackward0", "aten::add", "AddBackward0", "aten::mul", "MulBackward0", "bquant::native_batchquant",
    "BatchQuantFunction", "bquant::native_bn_act_quant", "EpilogueFunction", "bquant::native_gated_batchquant",
)  # fmt: skip


def top_level_ops(model: QFAMobileNetV3, x: torch.Tensor) -> collections.Counter:
    """Names of the parentless profiler events of one forward + backward."""
    model(x).sum().backward()  # warm-up: LSQ initialisation, allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)


def count_ops(width: float, batch: int, res: int) -> dict:
    torch.manual_seed(0)
    model = QFAMobileNetV3(n_classes=1000, width_mult=width)
    x = torch.randn(batch, 3, res, res)
    out = {}
    for bits in (4, 32):
        model.set_active_config(model.space.make_config(ks=7, e=6, d=4, w_bits=bits, a_bits=bits, resolution=res))
        for fused in (False, True):
            model.fused_epilogue = fused
            ops = top_level_ops(model, x)
            out[f"{'W4A4' if bits == 4 else 'fp'}_{'fused' if fused else 'unfused'}"] = {
                "total": sum(ops.values()),
                "most_common": ops.most_common(12),
            }
    return out


def saved_bytes(model: QFAMobileNetV3, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward of ``model``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def make_trainer(fused: bool, args: argparse.Namespace):
    from qfa.train import distributed, options
    from qfa.train.trainer import Trainer

    settings = {
        "data": "synthetic", "batch_size": args.batch_size, "resolutions": args.resolutions, "width_mult": 1.2,
        "subnets": 6, "bits": (2, 3, 4), "backend": args.backend, "channels_last": args.channels_last,
        "progress": False, "resume": "none", "out": tempfile.mkdtemp(prefix="qfa-bench-"), "calib_batches": 1,
        "fused_epilogue": fused, "amp": args.amp,
    }  # fmt: skip
    opts = options.resolve(options.TrainOptions, settings)
    return Trainer(opts, distributed.DistContext(device=torch.device(args.device)), log=lambda s: None)


def epilogue_time_us(prof, device: str) -> dict[str, float]:
    """Time (us) of the top-level epilogue ops (forward ops and autograd's backward nodes), each
    including the ops it dispatches, per op name fragment: CPU time, or on CUDA the time of the
    kernels they launch."""
    out: dict[str, float] = collections.defaultdict(float)
    for e in prof.events():
        if e.cpu_parent is not None:
            continue
        for name in EPILOGUE_OPS:
            if name in e.name:
                out[name] += e.device_time_total if device == "cuda" else e.cpu_time_total
                break
    return dict(out)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(args: argparse.Namespace) -> dict:
    trainers = {name: make_trainer(name == "fused", args) for name in ("unfused", "fused")}
    gen = torch.Generator().manual_seed(0)
    res = max(parse_resolutions(args.resolutions))
    images = torch.randn(args.batch_size, 3, res, res, generator=gen)
    labels = torch.randint(0, trainers["fused"].n_classes, (args.batch_size,), generator=gen)
    images, labels = images.to(args.device), labels.to(args.device)
    cuda = args.device == "cuda"
    times: dict[str, list[float]] = {name: [] for name in trainers}
    peak: dict[str, int] = {name: 0 for name in trainers}
    plans = list(range(1000, 1000 + args.steps))
    for tr in trainers.values():  # untimed pass: LSQ initialisation, allocations, Triton compilation
        for s in plans:
            tr.step = s
            tr.train_step(images, labels)
    for s in plans:  # interleaved timed steps: the same subnets for both
        for name, tr in trainers.items():
            tr.step = s
            _sync(args.device)
            if cuda:  # both trainers stay resident: count the step's peak above what it starts with
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            tr.train_step(images, labels)
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() - base)
    epi_us: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for s in plans:  # profiled steps, interleaved; the least loaded round of each variant is kept
        for name, tr in trainers.items():
            tr.step = s
            with profile(activities=activities) as prof:
                tr.train_step(images, labels)
                _sync(args.device)
            epi_us[name].append(epilogue_time_us(prof, args.device))
    self_us = {name: min(rounds, key=lambda r: sum(r.values())) for name, rounds in epi_us.items()}
    for tr in trainers.values():
        tr.guard.flush()
    result = {
        name: {"ms_min": 1e3 * min(t), "ms_median": 1e3 * statistics.median(t),
               "ms_per_step": [round(1e3 * v, 1) for v in t], "epilogue_ms": sum(self_us[name].values()) / 1e3,
               "epilogue_ms_by_op": {k: v / 1e3 for k, v in self_us[name].items()},
               **({"step_peak_mem_mb": peak[name] / 2**20} if cuda else {})}
        for name, t in times.items()
    }  # fmt: skip
    result["epilogue_time_kind"] = "cuda kernel time" if cuda else "cpu time"
    result["ratio_step_min"] = result["fused"]["ms_min"] / result["unfused"]["ms_min"]
    result["ratio_epilogue"] = result["fused"]["epilogue_ms"] / result["unfused"]["epilogue_ms"]
    model = trainers["fused"].model
    model.train()
    model.set_active_config(model.space.make_config(ks=7, e=6, d=4, w_bits=4, a_bits=4, resolution=res))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = images.contiguous(memory_format=fmt)  # on the step's device
    saved = {}
    amp = AMP_DTYPES[args.amp]
    for fused in (False, True):
        model.fused_epilogue = fused
        with torch.autocast(args.device, dtype=amp, enabled=amp is not None):
            saved["fused" if fused else "unfused"] = saved_bytes(model, x)
    result["saved_for_backward_mb"] = {k: v / 2**20 for k, v in saved.items()}
    return result


# (channels, input resolution / spatial size, activation, shortcut) of one layer per stage of the max
# subnet (width 1.2): the expand convs' outputs that the fused op finishes, then two project convs'
# outputs with their block's shortcut and the next block's quantizer, the sum handed on.
CALL_SHAPES = (
    (96, 2, "relu", False), (144, 4, "relu", False), (288, 8, "h_swish", False), (672, 16, "h_swish", False),
    (1152, 32, "h_swish", False), (32, 4, None, True), (96, 16, None, True),
)  # fmt: skip
FLOOR_PASSES = 8  # forward 2 reads + 1 write, backward 4 reads + 1 write of the activation
# With a shortcut: forward + the residual's read and the kept sum's write, backward + the residual's and
# the kept sum's gradient reads and the residual's gradient write.
SHORTCUT_PASSES = 5


def call_fns(y: torch.Tensor, act: str | None, backend: str, shortcut: bool = False) -> dict:
    """Forward + backward of the fused op and of the separate ops on ``y`` (random BN and quantizer
    parameters; with ``shortcut`` a residual added and the sum kept, a gradient flowing into both
    outputs), and a copy of ``y`` (the bandwidth reference), as callables."""
    C, dev = y.shape[1], y.device
    gen = torch.Generator().manual_seed(C)
    gamma = (torch.rand(C, generator=gen) + 0.5).to(dev).requires_grad_()
    beta = torch.randn(C, generator=gen).to(dev).requires_grad_()
    theta, offset = (torch.zeros(1, device=dev, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(y)
    r = torch.randn_like(y).requires_grad_() if shortcut else None
    leaves = (y, gamma, beta, theta, offset) + ((r,) if shortcut else ())
    act_fn = {None: lambda t: t, "relu": F.relu, "h_swish": F.hardswish}[act]

    def fused():
        out = bn_act_quant(y, gamma, beta, act=act, residual=r, theta=theta, offset=offset, bits=4,
                           return_activation=shortcut, backend=backend)  # fmt: skip
        return torch.autograd.grad(out, leaves, (grad, grad) if shortcut else grad)

    def separate():
        z = act_fn(F.batch_norm(y, None, None, gamma, beta, True, 0.0, 1e-5))
        z = z + r if shortcut else z
        out = batchquant(z, theta, offset, 4, backend=backend)
        return torch.autograd.grad((out, z) if shortcut else out, leaves, (grad, grad) if shortcut else grad)

    def copy():
        return y.detach().clone(memory_format=torch.preserve_format)

    return {"fused": fused, "separate": separate, "copy": copy}


# (channels, input resolution / spatial size) of the SE blocks' depthwise outputs, one per SE stage of the
# max subnet: SE's gate multiply with the project conv's quantizer (gated_batchquant) against the two ops.
GATED_CALL_SHAPES = ((288, 8), (672, 16), (1152, 32))
GATED_FLOOR_PASSES = 6  # forward 2 reads + 1 write, backward 2 reads (x, grad_y) + 1 write of the activation


def gated_call_fns(x: torch.Tensor, backend: str) -> dict:
    """Forward + backward of ``gated_batchquant`` and of ``x * gate`` then ``batchquant``, and a copy of ``x``."""
    N, C, dev = x.shape[0], x.shape[1], x.device
    gate = torch.rand(N, C, 1, 1, generator=torch.Generator().manual_seed(C)).to(dev, x.dtype).requires_grad_()
    theta, offset = (torch.zeros(1, device=dev, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(x)
    leaves = (x, gate, theta, offset)

    def fused():
        return torch.autograd.grad(gated_batchquant(x, gate, theta, offset, 4, backend=backend), leaves, grad)

    def separate():
        return torch.autograd.grad(batchquant(x * gate, theta, offset, 4, backend=backend), leaves, grad)

    def copy():
        return x.detach().clone(memory_format=torch.preserve_format)

    return {"fused": fused, "separate": separate, "copy": copy}


def _time_calls(fns: dict, dev: str) -> dict:
    if dev == "cuda":
        return {name: time_fn(fn, device=dev) for name, fn in fns.items()}
    return time_cpu_interleaved(fns, min_total_s=0.3)


def per_call(args: argparse.Namespace) -> list[dict]:
    """Fused op vs separate ops, forward + backward, per shape (see CALL_SHAPES)."""
    dev, res = args.device, max(parse_resolutions(args.resolutions))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = []
    for C, div, act, shortcut in CALL_SHAPES:
        H = max(1, res // div)
        y = torch.randn(args.batch_size, C, H, H, generator=torch.Generator().manual_seed(H))
        y = y.to(dev, AMP_DTYPES[args.amp] or torch.float32).contiguous(memory_format=fmt).requires_grad_()
        t = _time_calls(call_fns(y, act, args.backend, shortcut), dev)
        nbytes = y.numel() * y.element_size()
        floor = (FLOOR_PASSES + (SHORTCUT_PASSES if shortcut else 0)) * nbytes
        copy_gbps = 2 * nbytes / t["copy"] / 1e9
        rows.append({
            "shape": [args.batch_size, C, H, H], "act": act, "shortcut": shortcut, "fused_us": 1e6 * t["fused"],
            "separate_us": 1e6 * t["separate"], "ratio": t["fused"] / t["separate"], "copy_gbps": copy_gbps,
            "fused_gbps_at_floor": floor / t["fused"] / 1e9,
            "fused_vs_roofline": t["fused"] / (floor / (copy_gbps * 1e9)),
        })  # fmt: skip
    for C, div in GATED_CALL_SHAPES:
        H = max(1, res // div)
        x = torch.randn(args.batch_size, C, H, H, generator=torch.Generator().manual_seed(H))
        x = x.to(dev, AMP_DTYPES[args.amp] or torch.float32).contiguous(memory_format=fmt).requires_grad_()
        t = _time_calls(gated_call_fns(x, args.backend), dev)
        nbytes = x.numel() * x.element_size()
        copy_gbps = 2 * nbytes / t["copy"] / 1e9
        rows.append({
            "shape": [args.batch_size, C, H, H], "act": "se_gate", "shortcut": False, "fused_us": 1e6 * t["fused"],
            "separate_us": 1e6 * t["separate"], "ratio": t["fused"] / t["separate"], "copy_gbps": copy_gbps,
            "fused_gbps_at_floor": GATED_FLOOR_PASSES * nbytes / t["fused"] / 1e9,
            "fused_vs_roofline": t["fused"] / (GATED_FLOOR_PASSES * nbytes / (copy_gbps * 1e9)),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", default=None, help="quantizer backend of both trainers (default: cpu / triton)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolutions", default="24:32:4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--amp",
        default="none",
        choices=tuple(AMP_DTYPES),
        help="autocast dtype of the training step; per call, the dtype of the conv output",
    )
    p.add_argument("--skip-step", action="store_true", help="no training step")
    p.add_argument("--skip-calls", action="store_true", help="no per-call timing")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.backend = args.backend or ("triton" if args.device == "cuda" else "cpu")
    torch.set_num_threads(args.threads)
    record = {
        "benchmark": "epilogue",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": " ".join(["python", "bench/epilogue.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": vars(args),
        "top_level_ops": count_ops(1.2, 8, 32),
    }
    ops = record["top_level_ops"]
    for key, val in ops.items():
        print(f"top-level ops, max subnet fwd+bwd, {key}: {val['total']}")
    print("  most frequent (W4A4 fused):", ops["W4A4_fused"]["most_common"])
    if not args.skip_calls:
        calls = record["per_call"] = per_call(args)
        for r in calls:
            what = f"{r['act']}{' + shortcut' if r['shortcut'] else ''}"
            print(f"per call {'x'.join(map(str, r['shape']))} {what}: fused {r['fused_us']:.0f} us, "
                  f"separate {r['separate_us']:.0f} us ({r['ratio']:.2f}x); fused at its floor traffic "
                  f"{r['fused_gbps_at_floor']:.1f} GB/s = {1 / r['fused_vs_roofline']:.0%} of a copy's "
                  f"{r['copy_gbps']:.1f} GB/s")  # fmt: skip
    if not args.skip_step:
        step = record["train_step"] = train_step(args)
        for name in ("unfused", "fused"):
            r = step[name]
            mem = f", step peak {r['step_peak_mem_mb']:.0f} MB" if "step_peak_mem_mb" in r else ""
            print(f"train step {name}: min {r['ms_min']:.0f} ms, median {r['ms_median']:.0f} ms{mem}; "
                  f"time of the ops the fused ones replace {r['epilogue_ms']:.1f} ms")  # fmt: skip
        print(f"  ratios fused/unfused: step (min) {step['ratio_step_min']:.3f}, "
              f"epilogue time {step['ratio_epilogue']:.3f}")  # fmt: skip
        print(f"  saved for backward (max subnet forward): {step['saved_for_backward_mb']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
