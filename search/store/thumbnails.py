"""The thumbnails table's SQL: a small JPEG and its blurred variant per image, and which images blur by default."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from search.settings import Settings
from search.store.base import StoreBase
from search.store.rows import Thumbnail
from search.store.sql import chunks, marks

if TYPE_CHECKING:  # the mixin uses known_unsafe from LabelTables; importing it here at run time would be a cycle
    from search.store.labels import LabelTables as _Base
else:
    _Base = StoreBase

#: store_info key: true when the store was created with `index --thumbnails` (index runs and HTTP adds follow it).
THUMBNAILS_INFO = "thumbnails"


def insert_thumbnails(conn: sqlite3.Connection, rows: Sequence[tuple[int, Thumbnail]]) -> None:
    """Write (image id, thumbnail) rows inside the caller's transaction (the batch that writes those images)."""
    conn.executemany(
        "INSERT OR REPLACE INTO thumbnails (image_id, width, height, original, blurred) VALUES (?,?,?,?,?)",
        [(int(i), t.width, t.height, t.original, t.blurred) for i, t in rows],
    )


def blur_score(settings: Settings) -> float:
    """The score (at the verdict level) from which an image is blurred by default even when not known-unsafe."""
    return settings.nsfw_threshold if settings.blur_score is None else settings.blur_score


class ThumbnailTables(_Base):
    """Mixin of `Store`: the thumbnails table and the rule that says which thumbnails are blurred by default."""

    def thumbnails_enabled(self) -> bool:
        """Whether this store keeps thumbnails (chosen when it was created: `index --thumbnails`)."""
        return bool(self.get_info(THUMBNAILS_INFO, False))

    def enable_thumbnails(self) -> None:
        self.set_info(THUMBNAILS_INFO, True)

    def thumbnail(self, image_id: int, *, blurred: bool) -> bytes | None:
        """The blurred or the original JPEG of an image (None: it has none)."""
        col = "blurred" if blurred else "original"
        row = self.db.execute(f"SELECT {col} FROM thumbnails WHERE image_id = ?", [int(image_id)]).fetchone()
        return bytes(row[0]) if row else None

    def thumbnail_ids(self, ids: Sequence[int] | None = None) -> set[int]:
        """The images (among `ids`, or all) that have thumbnails."""
        if ids is None:
            return {int(r[0]) for r in self.db.execute("SELECT image_id FROM thumbnails")}
        out: set[int] = set()
        for chunk in chunks([int(i) for i in ids]):
            q = f"SELECT image_id FROM thumbnails WHERE image_id IN ({marks(chunk)})"
            out.update(int(r[0]) for r in self.db.execute(q, chunk))
        return out

    def count_thumbnails(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0])

    def blurred_by_default(self, settings: Settings, ids: Sequence[int]) -> set[int]:
        """The images among `ids` whose thumbnails are shown blurred unless revealed: every known-unsafe image,
        whatever its source (human, hash_list, model), and every image scoring at least the blur score at the
        verdict level (so a human `safe` on a high-scoring image still blurs it)."""
        ids = [int(i) for i in ids]
        unsafe = {i for i, sources in self.known_unsafe(settings, ids=ids).items() if sources}
        col, threshold = f"s_{settings.nsfw_level}", blur_score(settings)
        high: set[int] = set()
        for chunk in chunks(ids):
            q = f"SELECT id FROM images WHERE {col} >= ? AND id IN ({marks(chunk)})"
            high.update(int(r[0]) for r in self.db.execute(q, [threshold, *chunk]))
        return unsafe | high
