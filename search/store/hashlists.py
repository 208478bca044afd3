"""The hash-list tables' SQL (hash_lists, list_hashes, hash_matches): imported PDQ lists and their matches."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from search.pdq import HashMatcher
from search.store.base import StoreBase
from search.store.rows import utcnow
from search.store.sql import chunks, marks

#: Indexed images matched against a list per FAISS call during an import.
MATCH_BATCH = 10_000


class HashListTables(StoreBase):
    """Mixin of `Store`: imported hash lists, their entries, and which images match them."""

    def add_hash_list(
        self,
        name: str,
        hashes: Sequence[str],
        *,
        source: str | None,
        bad_lines: int,
        replace: bool,
        match_distance: int,
        within: int,
    ) -> tuple[int, int, int]:
        """Import `hashes` (normalised hex) under list `name` and match every indexed image against the list, in one
        transaction. An existing list grows unless `replace`. Matches are stored up to `match_distance`.

        Returns (list id, entries the list holds now, images within `within` bits of an entry)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT id FROM hash_lists WHERE name = ?", [name]).fetchone()
            if row and not replace:
                list_id = int(row[0])
            else:
                if row:
                    conn.execute(
                        "DELETE FROM hash_matches WHERE list_hash_id IN (SELECT id FROM list_hashes WHERE list_id = ?)",
                        [row[0]],
                    )
                    conn.execute("DELETE FROM list_hashes WHERE list_id = ?", [row[0]])
                    conn.execute("DELETE FROM hash_lists WHERE id = ?", [row[0]])
                cur = conn.execute(
                    "INSERT INTO hash_lists (name, source, imported_at, count, bad_lines) VALUES (?,?,?,0,0)",
                    [name, source, utcnow()],
                )
                list_id = int(cur.lastrowid or 0)
            # sqlite-utils nests its batches as savepoints inside this transaction
            self.db.table("list_hashes").insert_all(({"list_id": list_id, "hash": h} for h in hashes), ignore=True)
            total = int(conn.execute("SELECT COUNT(*) FROM list_hashes WHERE list_id = ?", [list_id]).fetchone()[0])
            conn.execute(
                "UPDATE hash_lists SET count = ?, bad_lines = bad_lines + ?, imported_at = ? WHERE id = ?",
                [total, bad_lines, utcnow(), list_id],
            )
            # match the whole store against this list (a FAISS binary index over the list)
            entries = conn.execute("SELECT id, hash FROM list_hashes WHERE list_id = ?", [list_id]).fetchall()
            matcher = HashMatcher()
            matcher.add([e[0] for e in entries], [e[1] for e in entries])
            images = conn.execute("SELECT id, pdq FROM images WHERE pdq IS NOT NULL").fetchall()
            matched: set[int] = set()
            for batch in chunks(images if len(matcher) else [], MATCH_BATCH):
                found = matcher.match([r[1] for r in batch], match_distance)
                rows = [(img[0], hid, dist) for img, hits in zip(batch, found, strict=True) for hid, dist in hits]
                self._insert_matches(rows)
                matched.update(r[0] for r in rows if r[2] <= within)
        return list_id, total, len(matched)

    def _insert_matches(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """(image id, list entry id, distance) rows; a pair already stored is kept."""
        self.db.table("hash_matches").insert_all(
            ({"image_id": i, "list_hash_id": h, "distance": d} for i, h, d in rows), ignore=True
        )

    def hash_list_entries(self) -> list[tuple[int, str, str]]:
        """(entry id, hash, list name) of every imported entry."""
        rows = self.db.execute(
            "SELECT h.id, h.hash, l.name FROM list_hashes h JOIN hash_lists l ON l.id = h.list_id"
        ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def hash_lists(self) -> list[dict[str, Any]]:
        """name, count and imported_at of every list, in import order (for stats)."""
        return [
            dict(zip(("name", "count", "imported_at"), r, strict=True))
            for r in self.db.execute("SELECT name, count, imported_at FROM hash_lists ORDER BY id")
        ]

    def hash_listed(self, max_distance: int, ids: Sequence[int] | None = None) -> set[int]:
        """Images with a stored match within `max_distance` bits (only among `ids` when given)."""
        q = "SELECT DISTINCT image_id FROM hash_matches WHERE distance <= ?"
        if ids is None:
            return {int(r[0]) for r in self.db.execute(q, [max_distance])}
        out: set[int] = set()
        for chunk in chunks([int(i) for i in ids]):
            out.update(
                int(r[0]) for r in self.db.execute(f"{q} AND image_id IN ({marks(chunk)})", [max_distance, *chunk])
            )
        return out

    def _hash_list_matcher(self, conn: sqlite3.Connection) -> HashMatcher | None:
        """A FAISS binary matcher over every imported list entry (ids = list_hashes ids), cached until lists change."""
        key = tuple(conn.execute("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM list_hashes").fetchone())
        if self._lists_key != key:
            rows = conn.execute("SELECT id, hash FROM list_hashes").fetchall()
            matcher = HashMatcher() if rows else None
            if matcher is not None:
                matcher.add([r[0] for r in rows], [r[1] for r in rows])
            self._lists_key, self._lists_matcher = key, matcher
        return self._lists_matcher
