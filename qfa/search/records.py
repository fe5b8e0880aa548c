"""JSON-lines sample files: tolerant reading, locked appending, atomic whole-file writes.

A collection run may be killed mid-write; its partial last line is ignored when reading and cut off
before the next append. Several processes (torchrun ranks) append to one file under an exclusive
``fcntl`` lock, each line in one write.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qfa.io import atomic_write_text as atomic_write_text  # re-exported (moved to qfa.io)
from qfa.io import drop_partial_last_line
from qfa.search.space import space_to_dict


def space_id(space: Any) -> str:
    """Short fingerprint of a search space: records from different supernets never mix."""
    blob = json.dumps(space_to_dict(space), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (empty list when the file does not exist).

    An unparsable *last* line without a trailing newline is a write cut short by a kill: it is
    skipped with a warning. Any other bad line is an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    records = []
    for lineno, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON record ({exc.msg})") from exc
    if tail.strip():
        try:
            records.append(json.loads(tail.decode("utf-8", errors="replace")))
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}: ignoring a partial last line ({len(tail)} bytes, from an interrupted run)", stacklevel=2
            )
    return records


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines under an exclusive lock, flushed to disk.

    A partial last line left by a killed writer is truncated first, so the file stays valid JSONL.
    """
    payload = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)
    if not payload:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        drop_partial_last_line(fd)
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def check_consistent(records: list[dict[str, Any]], path: str | os.PathLike) -> dict[str, Any]:
    """The search space shared by every record of a sample file. ValueError when a record lacks its
    config, when a sample appears twice (same seed and index: a held-out sample would also be a
    training one) or when the records come from different search spaces or supernets."""
    if not records:
        raise ValueError(f"{path}: no samples")
    bad = [i for i, r in enumerate(records) if not isinstance(r.get("config"), dict)]
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} record(s) without a 'config' dict (e.g. record {bad[0] + 1}); "
            "not written by qfa collect?"
        )
    seen: dict[tuple[Any, Any], int] = {}
    for i, r in enumerate(records):
        key = (r.get("seed"), r.get("index"))
        if key[1] is not None and key in seen:
            raise ValueError(
                f"{path}: records {seen[key] + 1} and {i + 1} are the same sample (seed {key[0]}, index {key[1]}); "
                "remove the duplicates"
            )
        seen[key] = i
    spaces = {r.get("space_id") for r in records}
    if len(spaces) != 1 or None in spaces:
        raise ValueError(
            f"{path}: records come from {len(spaces)} different search spaces ({sorted(map(str, spaces))})"
        )
    supernets = {r["supernet"] for r in records if "supernet" in r}
    if len(supernets) > 1:
        raise ValueError(
            f"{path}: records come from {len(supernets)} different supernets ({sorted(supernets)}); "
            "train a predictor on the samples of one supernet"
        )
    if "space" not in records[0]:
        raise ValueError(f"{path}: records lack the 'space' field (not written by qfa collect?)")
    return records[0]["space"]
