"""Atomic output: write to a temp file beside the target, rename on success, remove on failure.

A killed run or a failed write never leaves a truncated report, config, model or ONNX file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's directory; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual umask mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_writable(path: str | Path) -> None:
    """Fail before any work when ``path``'s directory (or the nearest one that exists) cannot take
    a new file: a read-only --out or --onnx directory is one line up front, with nothing written."""
    directory = Path(path).absolute().parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".sq-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write {path}: directory {directory} is not writable "
                         f"({e.strerror or type(e).__name__})") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
