"""Sample subnets, recalibrate and evaluate them on the held-out split, append one JSON line each.

Published mix: a uniform draw, then full resolution with p=0.4, full depth with p=0.3 and one
bit-width for all layers with p=0.3. Resumable (indices already in --out are skipped; a partial last
line from a killed run is ignored). Each record carries MACs, params, BitOPs, LUT-FLOPs and, where
defined, the published LUT-FLOPs (closed formula, or --flops-lut's table; docs/metrics.md). Under
torchrun each rank collects its own share (``index % WORLD_SIZE == RANK``) on its own GPU and appends
to the same file.
"""

from __future__ import annotations

import argparse

from qfa.checkpoint import weights_id
from qfa.search import runtime
from qfa.search.collect import CollectSettings, collect_samples
from qfa.search.sampling import SamplingMix


def add_arguments(p: argparse.ArgumentParser) -> None:
    runtime.add_supernet_arguments(p)
    p.add_argument("--out", required=True, help="JSONL file to append to (created if missing)")
    p.add_argument("--num-samples", type=int, required=True, help="total subnets of the run (all ranks)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sample i depends only on seed and i)")
    p.add_argument("--p-full-resolution", type=float, default=0.4, help="probability of the largest resolution")
    p.add_argument("--p-full-depth", type=float, default=0.3, help="probability of the largest depth in every stage")
    p.add_argument("--p-uniform-bits", type=float, default=0.3, help="probability of one bit-width for all layers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    runtime.add_flops_lut_arguments(p)


def run(args: argparse.Namespace) -> int:
    ranks = runtime.Ranks.from_env()
    device = runtime.resolve_device(args.device, ranks)
    model = runtime.load_model(args, device)  # fills in the data settings the flags leave out
    settings = CollectSettings(
        num_samples=args.num_samples,
        seed=args.seed,
        mix=SamplingMix(args.p_full_resolution, args.p_full_depth, args.p_uniform_bits),
        num_calib_batches=args.calib_batches,
    )
    cost_model = runtime.make_cost_model(args, model)  # before the data: a bad table must not wait for the loaders
    calib, val = runtime.make_loaders(args, model, device)
    added = collect_samples(
        model,
        args.out,
        calib,
        val,
        settings,
        rank=ranks.rank,
        world_size=ranks.world_size,
        progress=not args.no_progress,
        cost_model=cost_model,
        supernet=weights_id(model),
    )
    where = f" (rank {ranks.rank}/{ranks.world_size})" if ranks.world_size > 1 else ""
    print(f"collect{where}: added {added} sample(s) to {args.out}")
    return 0
