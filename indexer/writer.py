"""The writer stage of an index run: new images, exact-duplicate paths and per-file errors, in batched store writes."""

from __future__ import annotations

from collections.abc import Sequence

from indexer.corpus import Item
from indexer.summary import RunSummary, Timer
from search.store import ImageRecord, Store
from search.store.images import ErrorRow

#: Buffered duplicate paths or errors are written once this many wait (or with the next batch of images).
FLUSH_AT = 256

PathRow = tuple[str, str, int | None, int | None]  # path, sha256, size, mtime_ns


class RunWriter:
    """Buffers what one run writes besides its images and hands everything to `Store.write_batch` (one transaction
    per call, so a crash loses at most the batch in flight)."""

    def __init__(self, store: Store, run_id: int, summary: RunSummary, timer: Timer, *, match_distance: int) -> None:
        self.store = store
        self.run_id = run_id
        self.summary = summary
        self.timer = timer
        self.match_distance = match_distance
        self._dup_paths: list[PathRow] = []
        self._errors: list[ErrorRow] = []

    def images(self, records: Sequence[ImageRecord], paths: Sequence[PathRow]) -> None:
        """New images and every path that holds them, with the duplicate paths and errors waiting, in one batch."""
        with self.timer.stage("write"):
            self.store.write_batch(
                self.run_id,
                records,
                [*paths, *self._take_dups()],
                self._take_errors(),
                match_distance=self.match_distance,
            )

    def duplicate(self, item: Item, sha256: str) -> None:
        """A path whose content is already stored: only the path is recorded."""
        self._dup_paths.append((item.key, sha256, item.size, item.mtime_ns))
        self.summary.duplicate_paths += 1

    def error(self, key: str, reason: str, kind: str, *, size: int | None = None, mtime_ns: int | None = None) -> None:
        """A file that failed (it is recorded with the reason; the run goes on). With its size and mtime it is
        remembered like a success: the next run skips it while both are unchanged."""
        self.summary.add_error(key, reason)
        self._errors.append((key, reason, kind, size, mtime_ns))
        if len(self._errors) >= FLUSH_AT:
            self.flush_errors()

    def flush_duplicates(self, *, force: bool = False) -> None:
        if self._dup_paths and (force or len(self._dup_paths) >= FLUSH_AT):
            with self.timer.stage("write"):
                self.store.write_batch(self.run_id, [], self._take_dups(), self._take_errors())

    def flush_errors(self) -> None:
        if self._errors:
            with self.timer.stage("write"):
                self.store.write_batch(self.run_id, [], [], self._take_errors())

    def flush(self) -> None:
        """Everything still buffered."""
        self.flush_duplicates(force=True)
        self.flush_errors()

    def _take_dups(self) -> list[PathRow]:
        out, self._dup_paths = self._dup_paths, []
        return out

    def _take_errors(self) -> list[ErrorRow]:
        out, self._errors = self._errors, []
        return out
