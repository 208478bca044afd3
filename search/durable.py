"""Writing files so that a crash leaves the old version or the new one, never a torn one: fsync by path, and the
temp-file-fsync-rename-fsync-directory write the FAISS files and their manifests use."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file (or a directory) that is already written, by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(d: Path) -> None:
    """fsync a directory after a rename into it; a file system that refuses directory fsync is let be."""
    with contextlib.suppress(OSError):
        fsync_path(d)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
