"""Host time of one BatchQuant call with the kernels taken out: what the Python, autograd and
dispatcher layers cost per call.

On a GPU a call whose kernels run shorter than its launch path is bound by that path (the small
shapes; a supernet makes about 130 quantizer calls per subnet). For the backends registered in
Python (``reference``, and ``triton`` where it runs) the backend's kernels are replaced by stubs that
only allocate their outputs, and the ways to the same kernels are timed: the eager route that
``bquant_kernels.batchquant`` takes (an autograd.Function calling the implementation), the same Function
calling the opaque ``torch.library`` kernel ops that ``torch.compile`` traces ("via ops":
``bquant_kernels.ops.KERNEL_OPS_EAGERLY``; the cost that made the eager route skip them), and those
kernel ops alone. The native op of the ``cpu``
backend (csrc/ops.cpp) is timed with its real kernels on the same tiny tensor. CPU tensors, interleaved timing.

Usage::

    python bench/host_overhead.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bquant_kernels as bk  # noqa: E402
from bench.kernels import environment  # noqa: E402
from bench.timing import time_cpu_interleaved  # noqa: E402
from bquant_kernels.backends import get_backend  # noqa: E402
from bquant_kernels.qparams import NUM_QPARAMS  # noqa: E402
from qfa.io import atomic_write_text  # noqa: E402

SHAPE = (4, 8, 3, 3)


def _stub_kernels(name: str) -> Callable[[], None]:
    """Replace backend ``name``'s BatchQuant kernels with output-allocating stubs; returns the undo."""
    module = get_backend(name)
    saved = {f: getattr(module, f) for f in ("batchquant_forward", "batchquant_backward")}

    def forward(x, theta, offset, lo_hi, bits, signed, C, inner):
        return torch.empty_like(x), torch.empty(NUM_QPARAMS, dtype=torch.float32, device=x.device)

    def backward(grad_y, x, offset, qparams, bits, signed):
        return torch.empty_like(x), torch.empty_like(qparams[:1]), torch.empty_like(qparams[:1])

    module.batchquant_forward, module.batchquant_backward = forward, backward
    return lambda: [setattr(module, f, fn) for f, fn in saved.items()]


def routes(name: str, x: torch.Tensor, theta: torch.Tensor, offset: torch.Tensor, g: torch.Tensor) -> dict:
    inputs = (x, theta, offset)

    def grad(y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(y, inputs, g)

    if name == "cpu":
        return {
            "native fwd": lambda: bk.batchquant(x, theta, offset, 4, backend=name),
            "native fwd+bwd": lambda: grad(bk.batchquant(x, theta, offset, 4, backend=name)),
        }
    xd, td, od = x.detach(), theta.detach(), offset.detach()

    def custom_ops() -> tuple[torch.Tensor, ...]:
        _, qp = torch.ops.bquant.batchquant_fwd(xd, td, od, None, 4, False, name)
        return torch.ops.bquant.batchquant_bwd(g, xd, od, qp, 4, False, name)

    def via_ops(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            bk.ops.KERNEL_OPS_EAGERLY = True
            try:
                return fn()
            finally:
                bk.ops.KERNEL_OPS_EAGERLY = False

        return run

    return {
        "eager fwd": lambda: bk.batchquant(x, theta, offset, 4, backend=name),
        "eager fwd+bwd": lambda: grad(bk.batchquant(x, theta, offset, 4, backend=name)),
        "eager via ops fwd": via_ops(lambda: bk.batchquant(x, theta, offset, 4, backend=name)),
        "eager via ops fwd+bwd": via_ops(lambda: grad(bk.batchquant(x, theta, offset, 4, backend=name))),
        "custom op fwd": lambda: torch.ops.bquant.batchquant_fwd(xd, td, od, None, 4, False, name),
        "custom op fwd+bwd": custom_ops,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).requires_grad_()
    theta, offset = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    g = torch.randn(SHAPE, generator=gen)
    rows = []
    for name, (ok, why) in bk.backends().items():
        if not ok or "cpu" not in get_backend(name).DEVICES:
            print(f"{name}: skipped ({why if not ok else 'does not run on CPU tensors here'})")
            continue
        undo = _stub_kernels(name) if name != "cpu" else (lambda: None)
        try:
            times = time_cpu_interleaved(routes(name, x, theta, offset, g), min_total_s=0.5, warmup_s=0.05)
        finally:
            undo()
        rows += [{"backend": name, "route": route, "median_s": s} for route, s in times.items()]
    env = environment(torch.device("cpu"), list(sys.argv[1:] if argv is None else argv))
    env["command"] = env["command"].replace("bench/kernels.py", "bench/host_overhead.py")
    print(f"{env['device']['name']} | torch {env['torch']} | one call on {'x'.join(map(str, SHAPE))}, 1 thread")
    for r in rows:
        print(f"  {r['backend']:<10} {r['route']:<22} {r['median_s'] * 1e6:8.1f} us")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps({**env, "shape": list(SHAPE), "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
