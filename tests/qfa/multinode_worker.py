"""What every process of ``test_train_multinode.py`` runs under ``torchrun``:
``python multinode_worker.py DUMP qfa-train-args...`` is ``python -m qfa train qfa-train-args...``
(the CLI entry, with its error handling), after which each rank saves to ``DUMP/rank<R>.pt`` what the
test compares across ranks:

- ``model``: the trained weights;
- ``train_shard`` / ``calib_shard``: the dataset indices of this rank's epoch-0 training batches and
  of its recalibration batches (global rank, not local: the shards of the two nodes must differ);
- ``local_stats`` / ``synced_stats``: BN running statistics and BatchQuant ranges of the max 4-bit
  subnet recalibrated on this rank's shard alone (a one-rank process group) and across all ranks;
- ``sharded_eval`` / ``full_eval``: its evaluation on the sharded held-out set, counts summed over
  ranks, and on the whole held-out set by this rank alone.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from qfa import cli
from qfa import data as qdata
from qfa.calibrate import calibrate
from qfa.evaluate import evaluate
from qfa.train.trainer import Trainer, val_configs


def _stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    suffixes = ("running_mean", "running_var", "lo_hi")
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith(suffixes)}


def rank_view(trainer: Trainer) -> dict:
    ctx, opts, model = trainer.ctx, trainer.opts, trainer.model
    view: dict = {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank}
    view["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train_loader.sampler.set_epoch(0)
    view["train_shard"] = [i for _, i in trainer.train_loader.sampler]
    view["train_indices"] = list(trainer.train_loader.sampler.indices)
    view["calib_shard"] = [i for _, i in trainer.calib_loader.sampler]
    view["calib_indices"] = list(trainer.calib_loader.sampler.indices)

    alone = [dist.new_group([r]) for r in range(ctx.world_size)][ctx.rank]  # every rank creates every group
    cfg = val_configs(model, ["max"], [4], opts.resolution_list)[0]["config"]
    model.set_active_config(cfg)
    calibrate(model, trainer.calib_loader, opts.calib_batches, cfg.resolution, process_group=alone)
    view["local_stats"] = _stats(model)
    calibrate(model, trainer.calib_loader, opts.calib_batches, cfg.resolution)
    view["synced_stats"] = _stats(model)
    view["sharded_eval"] = evaluate(model, trainer.val_loader, cfg.resolution)
    _, whole = qdata.build_loaders(
        opts.data, opts.batch_size, opts.max_resolution, 0, False, opts.seed, device=trainer.device,
        channels_last=opts.channels_last, val_batch_size=trainer.val_loader.batch_size,
    )  # fmt: skip
    view["full_eval"] = evaluate(model, whole, cfg.resolution, process_group=alone)
    return view


def main(argv: list[str]) -> int:
    dump, args = argv[0], argv[1:]
    fit = Trainer.fit

    def fit_then_dump(self: Trainer):
        summary = fit(self)
        torch.save(rank_view(self), os.path.join(dump, f"rank{self.ctx.rank}.pt"))
        return summary

    Trainer.fit = fit_then_dump
    return cli.entry(["train", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
