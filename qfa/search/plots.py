"""PNG plots of the predictor and of the search (matplotlib's object API: no pyplot, no GUI backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qfa.io import atomic_path


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def plot_predictions(
    path: str | os.PathLike,
    measured: Sequence[float],
    predicted: Sequence[float],
    *,
    rmse: float | None = None,
    kendall_tau: float | None = None,
    train: tuple[Sequence[float], Sequence[float]] | None = None,
) -> None:
    """Predicted-vs-measured scatter of the held-out samples (optionally the training ones, faint)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    if train is not None:
        ax.scatter(train[0], train[1], s=8, alpha=0.25, color="tab:gray", label="train")
    ax.scatter(measured, predicted, s=14, color="tab:blue", label="held-out")
    values = np.concatenate([np.asarray(measured, float), np.asarray(predicted, float)])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8, ls="--", label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("measured accuracy")
    ax.set_ylabel("predicted accuracy")
    parts = [
        f"RMSE {rmse:.4g}" if rmse is not None else "",
        f"Kendall tau {kendall_tau:.3f}" if kendall_tau is not None else "",
    ]
    ax.set_title("Accuracy predictor  " + "  ".join(p for p in parts if p))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(
    path: str | os.PathLike,
    front_mflops: Sequence[float],
    front_predicted: Sequence[float],
    *,
    measured: tuple[Sequence[float], Sequence[float]] | None = None,
    samples: tuple[Sequence[float], Sequence[float]] | None = None,
    max_mflops: float | None = None,
    xlabel: str = "LUT-FLOPs (M)",
) -> None:
    """Accuracy vs cost (millions of the search's metric, named by ``xlabel``): the predicted front, its
    real measurements and the collected samples."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    if samples is not None:
        ax.scatter(samples[0], samples[1], s=8, alpha=0.3, color="tab:gray", label="collected samples")
    order = np.argsort(np.asarray(front_mflops, float))
    ax.plot(
        np.asarray(front_mflops, float)[order],
        np.asarray(front_predicted, float)[order],
        marker="o",
        ms=3,
        lw=1,
        color="tab:blue",
        label="front (predicted)",
    )
    if measured is not None and len(measured[0]):
        ax.scatter(measured[0], measured[1], s=22, marker="*", color="tab:red", label="front (measured)", zorder=3)
    if max_mflops is not None:
        ax.axvline(max_mflops, color="black", lw=0.8, ls=":", label=f"limit {max_mflops:g} M")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("NSGA-II search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
