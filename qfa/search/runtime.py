"""Command-line plumbing shared by ``qfa collect / search / export``: supernet, device, data loaders."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
from torch import nn

from qfa.commands.flags import add_checkpoint_arg, load_checkpoint
from qfa.cost import CostModel
from qfa.data import DIGITS, DeviceLoader, build_loaders, calib_loader
from qfa.train.distributed import parse_device


def add_supernet_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--device``, ``--backend`` and the data flags (:func:`add_data_arguments`): what
    :func:`load_model` and :func:`make_loaders` read."""
    add_checkpoint_arg(p)
    p.add_argument("--device", default=None, help="None: cuda (this rank's GPU under torchrun) if available, else cpu")
    p.add_argument("--backend", default=None, help="bquant_kernels backend (reference, cpu, triton, cuda)")
    add_data_arguments(p)


_RUN = "; None: the value stored by the run that wrote --checkpoint, else "


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Data flags; those left out take the checkpoint's run settings (:func:`load_model`), else the preset's
    (digits: batch 64, 8 recalibration batches; published: 256 and 30 of 64 images)."""
    p.add_argument("--data", default=None, help="'digits', 'synthetic' or an ImageFolder root with train/ and val/"
                   + _RUN + "digits")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size" + _RUN + "the preset's")
    p.add_argument("--calib-batches", type=int, default=None, help="recalibration batches per subnet" + _RUN
                   + "the preset's (published: 30)")  # fmt: skip
    p.add_argument("--calib-batch-size", type=int, default=None, help="recalibration batch size" + _RUN
                   + "the preset's (published: 64)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="data loader processes")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the calibration subset and its augmentation"
                   + _RUN + "0")  # fmt: skip
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format" + _RUN + "off")  # fmt: skip


# When neither the flag nor the checkpoint gives a value: (digits preset, published recipe).
_PRESET_DEFAULTS = {"batch_size": (64, 256), "calib_batches": (8, 30), "calib_batch_size": (64, 64),
                    "data_seed": (0, 0), "channels_last": (False, False)}  # fmt: skip


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
    """The supernet of ``--checkpoint`` (any layout of :func:`qfa.checkpoint.load_any`) on ``device``,
    eval mode. Data flags left out are filled in from the checkpoint's run, else from the preset."""
    loaded, args.data = load_checkpoint(args.checkpoint, getattr(args, "data", None), args.backend)
    run = loaded.run
    preset = 0 if args.data == DIGITS else 1
    # A training run recalibrates with its own batch size: that is the calibration batch size to reproduce.
    from_run = {"batch_size": run.get("batch_size"), "calib_batches": run.get("calib_batches"),
                "calib_batch_size": run.get("batch_size"), "data_seed": run.get("seed"),
                "channels_last": run.get("channels_last")}  # fmt: skip
    for name, value in from_run.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value if value is not None else _PRESET_DEFAULTS[name][preset])
    args.checkpoint_run = run
    args.checkpoint_subnet = loaded.subnet
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    return loaded.model.to(device, memory_format=memory_format).eval()


def make_loaders(args: argparse.Namespace, model: nn.Module, device: torch.device) -> tuple[DeviceLoader, DeviceLoader]:
    """``(calib, val)`` loaders at the largest resolution of the space (subnets resize on the device)."""
    resolution = max(model.space.resolutions)
    common = {"workers": args.workers, "distributed": False, "seed": args.data_seed, "device": device,
              "channels_last": args.channels_last}  # fmt: skip
    calib = calib_loader(
        args.data, batch_size=args.calib_batch_size, resolution=resolution, num_batches=args.calib_batches, **common
    )
    _, val = build_loaders(args.data, batch_size=args.batch_size, resolution=resolution, **common)
    return calib, val


def add_flops_lut_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--flops-lut",
        default=None,
        help="FLOPs table in the published layout (JSON, or the published pickled .npy with --allow-pickle) to "
        "compute published_lut_flops with; None: the closed formula of the published table (docs/metrics.md)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow reading a .npy --flops-lut (a pickle: loading it runs code from the file; prefer JSON)",
    )


def make_cost_model(args: argparse.Namespace, space_or_model: object, n_classes: int = 1000) -> CostModel:
    """The cost model of a supernet (or of a search space with ``n_classes``) with ``--flops-lut`` /
    ``--allow-pickle``."""
    if args.allow_pickle and args.flops_lut is None:
        raise ValueError("--allow-pickle is only meaningful with --flops-lut")
    return CostModel(space_or_model, n_classes, flops_lut=args.flops_lut, allow_pickle=args.allow_pickle)
