"""Command-line plumbing shared by ``qfa collect / search / export``: supernet, device, data loaders."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qfa.checkpoint import load_supernet
from qfa.data import DeviceLoader, build_loaders, calib_loader, num_classes
from qfa.train.distributed import parse_device


def add_supernet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="supernet checkpoint (qfa train / qfa.checkpoint.save_supernet)")
    p.add_argument("--device", default=None, help="None: cuda (this rank's GPU under torchrun) if available, else cpu")
    p.add_argument("--backend", default=None, help="bquant_kernels backend (reference, cpu, triton, cuda)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="'digits', 'synthetic' or an ImageFolder root with train/ and val/")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--calib-batches", type=int, default=30, help="recalibration batches per subnet (spec: 30)")
    p.add_argument("--calib-batch-size", type=int, default=64, help="recalibration batch size (spec: 64)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the calibration subset and its augmentation")


@dataclass(frozen=True)
class Ranks:
    """This process's place under torchrun (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``), or a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str | None, ranks: Ranks = Ranks()) -> torch.device:
    if name is not None:
        return parse_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def load_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The supernet of ``--checkpoint`` on ``device`` (eval mode), with ``--backend`` as its backend."""
    path = Path(args.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: file not found: {path}")
    model = load_supernet(path)
    data = getattr(args, "data", None)
    if data is not None and model.n_classes != (n := num_classes(data)):
        # Otherwise an IndexError deep in the loss, or (fewer ImageFolder classes) silently wrong accuracy.
        raise ValueError(f"--checkpoint has {model.n_classes} classes but --data {data!r} has {n}")
    if args.backend is not None:
        model.backend = args.backend  # its quantizers, and the static subnets it builds
    return model.to(device).eval()


def make_loaders(args: argparse.Namespace, model: nn.Module, device: torch.device) -> tuple[DeviceLoader, DeviceLoader]:
    """``(calib, val)`` loaders at the largest resolution of the space (subnets resize on the device)."""
    resolution = max(model.space.resolutions)
    common = {"workers": args.workers, "distributed": False, "seed": args.data_seed, "device": device}
    calib = calib_loader(
        args.data, batch_size=args.calib_batch_size, resolution=resolution, num_batches=args.calib_batches, **common
    )
    _, val = build_loaders(args.data, batch_size=args.batch_size, resolution=resolution, **common)
    return calib, val
