"""The writer lock: one writer per store, a flock on DIR/writer.lock that names its holder."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from search.errors import StoreLocked
from search.store.rows import utcnow

LOCK_FILE = "writer.lock"


class WriterLock:
    """One writer per store: a non-blocking flock on DIR/writer.lock. Readers never take it."""

    def __init__(self, root: Path, purpose: str) -> None:
        self.path = root / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> WriterLock:
        """Take the lock, retrying until `timeout` seconds have passed; StoreLocked names the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = ""
                    with contextlib.suppress(OSError):
                        holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise StoreLocked(
                        f"another nsfw-index writer holds {self.path.parent}"
                        + (f" ({holder})" if holder else "")
                        + "; wait for it to finish (readers and queries keep working meanwhile)"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {self.purpose}, since {utcnow()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WriterLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
