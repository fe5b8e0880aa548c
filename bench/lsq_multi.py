"""Benchmark of multi-tensor LSQ over every weight of the largest QFA subnet.

Times the forward, the backward op alone and forward+backward (``torch.autograd.grad``) of
``bquant_kernels.lsq_multi`` (one launch each way on the ``cuda`` backend) against the per-layer loop
``[bquant_kernels.lsq(w, s, b) for ...]`` that a model calling one quantizer per layer runs, for the
weights of the max subnet (kernel 7, expand 6, depth 4)
of the default QFA MobileNetV3 with mixed 2/3/4-bit weights.

Usage::

    python bench/lsq_multi.py [--device cuda|cpu] [--dtype fp32|bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bquant_kernels as bk  # noqa: E402
from bench.kernels import DTYPES, environment  # noqa: E402
from bench.timing import time_fn  # noqa: E402
from qfa.io import atomic_write_text  # noqa: E402
from qfa.networks import QFAMobileNetV3  # noqa: E402


def max_subnet_weights(
    device: torch.device, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Weights, LSQ steps and (seeded random 2/3/4) bits of every quantized layer of the max subnet."""
    net = QFAMobileNetV3()
    net.set_active_subnet(ks=7, e=6, d=4, w_bits=4, a_bits=4)
    subnet = net.get_active_subnet()
    rng = random.Random(0)
    weights, steps, bits = [], [], []
    for module in subnet.modules():
        quantizer = getattr(module, "w_quantizer", None)
        if quantizer is None or not hasattr(module, "weight"):
            continue
        w = module.weight.detach().to(device=device, dtype=dtype).requires_grad_()
        b = rng.choice((2, 3, 4))
        step = (2 * w.detach().float().abs().mean() / (2 ** (b - 1) - 1) ** 0.5).reshape(1)
        weights.append(w)
        steps.append(step.requires_grad_())
        bits.append(b)
    return weights, steps, bits


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights, steps, bits = max_subnet_weights(device, DTYPES[args.dtype])
    backend = "cuda" if device.type == "cuda" else None
    inputs = [*weights, *steps]
    grads = [torch.randn_like(w) for w in weights]
    n = len(weights)

    def loop() -> list[torch.Tensor]:
        return [bk.lsq(w, s, b, backend=backend) for w, s, b in zip(weights, steps, bits, strict=True)]

    def multi() -> list[torch.Tensor]:
        return bk.lsq_multi(weights, steps, bits, backend=backend)

    impls = {"per-layer loop": loop, "lsq_multi": multi}
    # The backward ops alone, without the autograd engine: with 130 leaf inputs the engine's own
    # per-input work (a graph task per input, same for both) outweighs the kernels on a slow host.
    full = [w.numel() for w in weights]
    plain = [w.detach() for w in weights], [s.detach() for s in steps]
    backward_ops = {
        "per-layer loop": lambda: [
            torch.ops.bquant.native_lsq_bwd(g, w, s, b, True, nf)
            for g, w, s, b, nf in zip(grads, *plain, bits, full, strict=True)
        ],
        "lsq_multi": lambda: torch.ops.bquant.native_lsq_multi_bwd(grads, *plain, bits, True, full),
    }
    with torch.no_grad():
        mismatch = max(float((a - b).abs().max()) for a, b in zip(loop(), multi(), strict=True))
    rows = []
    for name, fn in impls.items():
        for pass_, closure in (
            ("fwd", fn),
            ("bwd op", backward_ops[name]),
            ("fwd+bwd", lambda fn=fn: torch.autograd.grad(fn(), inputs, grads)),
        ):
            rows.append({"impl": name, "pass": pass_, "median_s": time_fn(closure, device=device)})
    for r in rows:
        base = next(x["median_s"] for x in rows if x["impl"] == "per-layer loop" and x["pass"] == r["pass"])
        r["speedup_vs_loop"] = base / r["median_s"]
    env = environment(device, list(sys.argv[1:] if argv is None else argv))
    env["command"] = env["command"].replace("bench/kernels.py", "bench/lsq_multi.py")
    numel = sum(w.numel() for w in weights)
    print(f"{env['device']['name']} | torch {env['torch']} | {n} weights, {numel} elements, {args.dtype}")
    print(f"max |lsq_multi - loop| = {mismatch:.3g}")
    for r in rows:
        print(f"  {r['impl']:<15} {r['pass']:<8} {r['median_s'] * 1e6:10.1f} us  {r['speedup_vs_loop']:.2f}x vs loop")
    if args.json is not None:
        report = {**env, "tensors": n, "elements": numel, "dtype": args.dtype, "bits": bits, "max_abs_diff": mismatch}
        report["rows"] = rows
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
