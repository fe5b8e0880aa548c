"""Run output: a JSON-lines metrics file and plain-text tables (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qfa.io import drop_partial_last_line


class JsonlLog:
    """Appends one JSON object per line to ``path`` (flushed each time, so a crash loses nothing)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable, allow_nan=True) + "\n")


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by a killed run (``qfa.io.drop_partial_last_line``)."""
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        drop_partial_last_line(fd)
    finally:
        os.close(fd)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, (set, tuple)):
        return list(v)
    return str(v)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """A fixed-width text table of ``rows`` (numbers right-aligned)."""
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    out = [line(list(columns)), "  ".join("-" * w for w in widths)] + [line(row) for row in cells]
    if title:
        out.insert(0, title)
    return "\n".join(s.rstrip() for s in out)
