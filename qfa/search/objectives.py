"""The two search objectives as vectorised functions of a genome matrix (see :mod:`qfa.search.nsga`)."""

from __future__ import annotations

import numpy as np

from qfa.cost import CostModel
from qfa.search.encoding import SubnetEncoder, translate_genes
from qfa.search.nsga import AccuracyFn, CostFn
from qfa.search.predictor import AccuracyPredictor


def predicted_accuracy(predictor: AccuracyPredictor, search_encoder: SubnetEncoder) -> AccuracyFn:
    """Genes of ``search_encoder`` -> the predictor's accuracy (re-indexed into its own encoding)."""
    search_encoder.check_space(predictor.encoder.space, what="predictor's")

    def accuracy(genes: np.ndarray) -> np.ndarray:
        return predictor.predict_genes(translate_genes(genes, search_encoder, predictor.encoder))

    return accuracy


def subnet_costs(cost_model: CostModel, search_encoder: SubnetEncoder) -> CostFn:
    """Genes of ``search_encoder`` -> ``{"lut_flops", "bitops", "macs", "params"}`` from the cost model."""

    def cost(genes: np.ndarray) -> dict[str, np.ndarray]:
        return cost_model.evaluate_batch(search_encoder.to_arrays(genes))

    return cost
