"""The ``qfa`` command: ``qfa <subcommand> [options]`` (also ``python -m qfa`` and ``torchrun -m qfa``).

Each subcommand lives in ``qfa/commands/<name>.py`` with ``add_arguments(parser)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys

from .checkpoint import CheckpointKeyError
from .train.ckpt import CheckpointError
from .train.step import NonFiniteLossError

SUBCOMMANDS = {
    "train": "train the supernet (sandwich + random subnets, KD, torchrun multi-GPU)",
    "calibrate": "recalibrate BN and BatchQuant statistics of a subnet",
    "eval": "recalibrate and evaluate subnets",
    "collect": "sample, recalibrate and evaluate subnets; append JSON lines",
    "predictor": "train the accuracy predictor on collected samples",
    "search": "NSGA-II search over predicted accuracy and a cost (LUT-FLOPs, published LUT-FLOPs, BitOPs, MACs)",
    "export": "export a subnet: standalone quantized model and ONNX",
    "cost": "MACs, params, BitOPs, LUT-FLOPs and published LUT-FLOPs of subnets (no data needed)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qfa",
        description="Quantized-for-all supernet: train, search, export.",
        epilog="Shared flags: --checkpoint FILE (the supernet: supernet.pt, last.pt, a calibrated or a published "
        "checkpoint), --subnets (subnet configs), --config FILE (an options file). See docs/cli.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"qfa.commands.{name}")
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; errors propagate (for tests and callers that want the exception)."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (bad flags, files, data): reported in one line, not as a traceback.
    Other exceptions (bugs) keep their traceback."""
    return (
        CheckpointError,
        CheckpointKeyError,
        NonFiniteLossError,
        ValueError,
        TypeError,
        OSError,
        pickle.UnpicklingError,
    )


def entry(argv: list[str] | None = None) -> int:
    """The console entry (``qfa``, ``python -m qfa``): like :func:`main`, but a user-facing error is one
    line on stderr, ``qfa <command>: error: <message>``, with exit code 1; Ctrl-C exits with 130."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: no traceback (qfa train handles it itself, at a step boundary)
        print(f"qfa {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # KeyError's str() quotes
        msg = " ".join(line.strip() for line in str(msg).splitlines() if line.strip()) or type(err).__name__
        print(f"qfa {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(entry())
