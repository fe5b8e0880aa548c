"""Train a QFA supernet: per step the min, max and random subnets of one batch, each at its own
resolution, with label-smoothed cross-entropy plus distillation, gradients summed, one SGD step.

Without arguments this trains the digits demo (scikit-learn's bundled 8x8 digits, a small supernet,
about 3 minutes on 2 CPU cores); `--data PATH` with an ImageFolder tree uses the published recipe.
Phases: `--bits 2,3,4,32` (phase 0), then `--bits 2,3,4 --init OUT/supernet.pt` (phase 1).
Multi-GPU / multi-node: `torchrun --nproc-per-node N -m qfa train ...`. Resume: `--resume auto`
(the default) continues from OUT/last.pt. Ctrl-C stops at the next step boundary (under torchrun: all
ranks at the same one), writes OUT/last.pt and exits with status 130; the same command resumes.
"""

from __future__ import annotations

import argparse
import sys

from ..train import distributed, options
from ..train.ckpt import CheckpointError
from ..train.step import NonFiniteLossError
from ..train.trainer import Trainer, TrainingInterrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, options.TrainOptions)


def run(args: argparse.Namespace) -> int:
    opts = options.resolve(options.TrainOptions, args)
    ctx = distributed.setup(opts.device)
    try:
        Trainer(opts, ctx).fit()
    except (NonFiniteLossError, CheckpointError) as err:
        print(f"qfa train: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        if ctx.is_main:  # every rank stopped at the same step; one line, like the trainer's other output
            print(f"qfa train: {err}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
    except RuntimeError as err:
        message = distributed.describe_peer_failure(err, ctx)
        if message is None:
            raise
        print(f"qfa train: error: {message}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    return 0
