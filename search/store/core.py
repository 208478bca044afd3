"""`Store`: the SQLite side of a store directory, assembled from its table mixins; `Store.writing()` opens and takes
the writer lock together."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from search.policy import SOURCES
from search.settings import LEVELS, Settings
from search.store.clusters import ClusterTables
from search.store.labels import LabelTables
from search.store.probes import ProbeTables
from search.store.runs import RunTables
from search.store.schema import SCHEMA_VERSION
from search.store.thumbnails import ThumbnailTables


class Store(ThumbnailTables, ClusterTables, LabelTables, RunTables, ProbeTables):
    """The SQLite side of a store. Cheap to open; one per thread (sqlite connections are not shared).

    `Store(root, create=False, readonly=False)` opens it; `Store.writing(root, purpose)` opens it writable and holds
    the writer lock. Every SQL statement of nsfw-index lives in this class and its mixins."""

    @classmethod
    @contextlib.contextmanager
    def writing(
        cls, root: str | os.PathLike[str], purpose: str, *, create: bool = False, timeout: float = 0.0
    ) -> Iterator[Store]:
        """Open writable and take the writer lock (StoreLocked at once, or after `timeout` seconds); release the
        lock and close on exit."""
        store = cls(root, create=create)
        try:
            with store.writer_lock(purpose).acquire(timeout):
                yield store
        finally:
            store.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counts(self, settings: Settings) -> dict[str, Any]:
        """The counting part of `stats`: images, paths, duplicates, errors, levels, known-unsafe, labels, lists."""
        images = self.count_images()
        paths = int(self.db.execute("SELECT COUNT(*) FROM paths").fetchone()[0])
        dup_images = int(
            self.db.execute(
                "SELECT COUNT(*) FROM (SELECT image_id FROM paths GROUP BY image_id HAVING COUNT(*) > 1)"
            ).fetchone()[0]
        )
        levels = {lv: 0 for lv in LEVELS}
        for lv, n in self.db.execute("SELECT level, COUNT(*) FROM images GROUP BY level"):
            levels[lv] = int(n)
        unsafe = self.known_unsafe(settings)
        by_source = {s: sum(1 for v in unsafe.values() if s in v) for s in SOURCES}
        return {
            "images": images,
            "paths": paths,
            "exact_duplicates": {"images": dup_images, "extra_paths": paths - images},
            "errors": self.count_errors(),
            "levels": levels,
            "known_unsafe": {"total": len(unsafe), **by_source},
            "labels": self.label_counts(),
            "hash_lists": self.hash_lists(),
            "schema_version": SCHEMA_VERSION,
        }

    def answer_state(self) -> tuple[int, ...]:
        """Changes whenever the SQLite data that search answers depend on changes (images, labels, hash lists)."""
        return (
            self.max_image_id(),
            self.count_images(),
            self.deletion_epoch(),
            self.last_label_event(),
            int(self.db.execute("SELECT COUNT(*) FROM hash_matches").fetchone()[0]),
            int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM list_hashes").fetchone()[0]),
            self.hash_list_version(),  # a deleted list (even one no image matched) changes the answers
        )
