"""File writes that survive a crash. Atomic writes: every file qfa writes (checkpoints, predictors,
exports, JSON, plots) goes to a temporary file in the target's directory, is fsynced, then
``os.replace``-d over the target, so a reader (or a run resumed after a crash) sees the previous
complete file or the new one, never a torn one. On an error the temporary file is removed and the
target is left as it was. Appended JSON-lines files instead cut a torn last line before appending
(:func:`drop_partial_last_line`).

Only the standard library and torch are imported here (a writer process can load this file alone).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # temporary files: ``.tmp-<name>.<random><suffix>`` next to the target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; when the block ends normally it is fsynced and
    renamed over ``path``; on an exception it is deleted and ``path`` is untouched.

    ``suffix``: the temporary file's ending, for writers that insist on one (``np.savez``: ``.npz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=suffix)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (or the replaced file's), so
        # checkpoints and exports in a shared directory stay readable as before.
        os.fchmod(fd, _target_mode(path))
    finally:
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Makes the rename itself durable; not every platform can open (or fsync) a directory.
    with contextlib.suppress(OSError):
        _fsync(path.parent, os.O_RDONLY)


def _target_mode(path: Path) -> int:
    """Permission bits for a new ``path``: the existing file's, else ``0o666`` less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # /proc gives it without changing it; os.umask has to set it to read it (racy with other threads).
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (see the module doc); returns ``path`` as a :class:`Path`."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def drop_partial_last_line(fd: int) -> None:
    """Truncate the file open as ``fd`` (read-write) after its last newline: a line left unfinished by a
    killed writer is cut off, so the next append starts a line of its own instead of gluing onto it."""
    size = os.fstat(fd).st_size
    end = _end_of_last_line(fd, size)
    if end != size:
        os.ftruncate(fd, end)


def _end_of_last_line(fd: int, size: int, chunk: int = 1 << 16) -> int:
    """Offset just past the last newline of the file (0 if there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - chunk)
        block = os.pread(fd, pos - start, start)
        k = block.rfind(b"\n")
        if k >= 0:
            return start + k + 1
        pos = start
    return 0


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files and staging directories left in ``directory`` by writers killed
    mid-write; returns what was removed. Only safe where no other process is writing into
    ``directory`` at the same time."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX) and not p.is_symlink())
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of an input file; a file that is not UTF-8 is a ``ValueError`` naming ``what``
    (the flag that gave it) and the file, not a bare codec error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {os.fspath(path)!r}: not a UTF-8 text file (byte {err.start}: {err.reason})"
        ) from None


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``obj`` with every non-finite float written as ``null`` (strict JSON: other
    parsers reject ``NaN`` / ``Infinity``)."""
    import json
    import math

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, **kwargs)
