"""Search over a trained QFA supernet (spec 6): sample collection, accuracy predictor, NSGA-II.

Modules: :mod:`~qfa.search.sampling` (the published collection mix), :mod:`~qfa.search.collect`
(resumable, multi-rank collection into JSONL), :mod:`~qfa.search.encoding` (one-hot features and
the search genome), :mod:`~qfa.search.predictor` (the MLP), :mod:`~qfa.search.nsga` (pymoo
NSGA-II), :mod:`~qfa.search.reevaluate` (exact re-evaluation with early stopping),
:mod:`~qfa.search.plots`. The commands are ``qfa collect / predictor / search``.
"""

from .encoding import SubnetEncoder
from .nsga import Constraints, NSGASettings, SearchResult, run_nsga2
from .predictor import AccuracyPredictor, load_predictor, save_predictor, train_predictor
from .sampling import SamplingMix, sample_config, sample_rng

__all__ = [
    "AccuracyPredictor",
    "Constraints",
    "NSGASettings",
    "SamplingMix",
    "SearchResult",
    "SubnetEncoder",
    "load_predictor",
    "run_nsga2",
    "sample_config",
    "sample_rng",
    "save_predictor",
    "train_predictor",
]
