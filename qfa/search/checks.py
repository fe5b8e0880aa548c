"""Validation of the search's settings dataclasses: one message per kind of bound."""

from __future__ import annotations


def check_at_least(settings: object, **minimums: int) -> None:
    """``ValueError`` naming the first field of ``settings`` below its minimum."""
    for name, low in minimums.items():
        value = getattr(settings, name)
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def check_probabilities(settings: object, *names: str) -> None:
    """``ValueError`` naming the first of the fields ``names`` of ``settings`` outside [0, 1]."""
    for name in names:
        p = getattr(settings, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
