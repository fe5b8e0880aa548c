"""Data of the published QFA results shipped with the package: the published Pareto front.

``pareto.jsonl``: the 181 subnets of the published Pareto front (``pareto_archs.npy`` of the published
code), one JSON line each: ``index``, ``config`` (a :class:`qfa.SubnetConfig` dict), the published
``gene`` and ``published_lut_mflops`` (the published search's score). Select it by name:
``qfa eval --subnets published-pareto`` / ``qfa cost --subnets published-pareto`` (docs/metrics.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PARETO_NAME = "published-pareto"


def pareto_path() -> Path:
    """Path of the shipped ``pareto.jsonl``."""
    return Path(str(resources.files(__name__).joinpath("pareto.jsonl")))


def subnets_file(spec: str) -> str:
    """``spec`` with the name of a shipped config file replaced by its path (other specs unchanged)."""
    return str(pareto_path()) if spec == PARETO_NAME else spec
