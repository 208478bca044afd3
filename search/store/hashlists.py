"""The hash-list tables' SQL (hash_lists, list_hashes, hash_matches, hash_list_events, pdq_dihedral): imported PDQ
lists as banks (import, list, show, export, delete, their history), images' dihedral hashes and their matches."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from search.answers import HashListEvent, HashListSummary
from search.errors import NotFound
from search.pdq import DIHEDRAL, HashMatcher, dihedral_blob, dihedral_from_blob, match_transforms
from search.store.base import StoreBase
from search.store.rows import utcnow
from search.store.sql import chunks, marks

#: Indexed images matched against a list per FAISS call during an import.
MATCH_BATCH = 10_000

#: (image id, its PDQ hash, its 7 other dihedral hashes or None when they are not known)
ImageHashes = tuple[int, str, Sequence[str] | None]

_EVENT_COLUMNS = "id, action, who, at, entries, changed, source, reason"


def _event(row: Sequence[Any]) -> HashListEvent:
    return HashListEvent(
        event=int(row[0]),
        action=row[1],
        who=str(row[2]),
        at=str(row[3]),
        entries=int(row[4]),
        changed=int(row[5]),
        source=row[6],
        reason=row[7],
    )


class HashListTables(StoreBase):
    """Mixin of `Store`: imported hash lists, their entries and history, images' dihedral PDQ hashes, and which
    images match which entry (at which distance, through which transform)."""

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
        who: str = "unknown",
        notes: Mapping[str, str] | None = None,
    ) -> tuple[int, int, int]:
        """Import `hashes` (normalised hex, with their `notes`) under list `name` and match every indexed image
        (its dihedral hashes too) against the list, in one transaction, recording the event (`who`). An existing
        list grows unless `replace`. Matches are stored up to `match_distance`.

        Returns (list id, entries the list holds now, images within `within` bits of an entry)."""
        notes = notes or {}
        with self.transaction() as conn:
            row = conn.execute("SELECT id FROM hash_lists WHERE name = ?", [name]).fetchone()
            action = "replace" if row and replace else "import"
            if row and not replace:
                list_id = int(row[0])
            else:
                if row:
                    self._drop_list(conn, int(row[0]))
                cur = conn.execute(
                    "INSERT INTO hash_lists (name, source, imported_at, count, bad_lines) VALUES (?,?,?,0,0)",
                    [name, source, utcnow()],
                )
                list_id = int(cur.lastrowid or 0)
            before = self._count_entries(conn, list_id)
            # sqlite-utils nests its batches as savepoints inside this transaction
            self.db.table("list_hashes").insert_all(
                ({"list_id": list_id, "hash": h, "note": notes.get(h)} for h in hashes), ignore=True
            )
            total = self._count_entries(conn, list_id)
            now = utcnow()
            conn.execute(
                "UPDATE hash_lists SET count = ?, bad_lines = bad_lines + ?, imported_at = ?, source = ?, "
                "imported_by = ? WHERE id = ?",
                [total, bad_lines, now, source, who, list_id],
            )
            self._add_event(conn, name, action, who, now, total, total - before, source, None)
            # match the whole store against this list (a FAISS binary index over the list)
            entries = conn.execute("SELECT id, hash FROM list_hashes WHERE list_id = ?", [list_id]).fetchall()
            matcher = HashMatcher()
            matcher.add([e[0] for e in entries], [e[1] for e in entries])
            images = self._image_hashes(conn) if len(matcher) else []
            matched: set[int] = set()
            for batch in chunks(images, MATCH_BATCH):
                rows = self._match_images(batch, matcher, match_distance)
                matched.update(r[0] for r in rows if r[2] <= within)
        return list_id, total, len(matched)

    # -- matching ------------------------------------------------------------------------------------------------------
    def _image_hashes(self, conn: sqlite3.Connection) -> list[ImageHashes]:
        """Every image with a PDQ hash, with its dihedral hashes where they are stored."""
        rows = conn.execute(
            "SELECT i.id, i.pdq, d.hashes FROM images i LEFT JOIN pdq_dihedral d ON d.image_id = i.id "
            "WHERE i.pdq IS NOT NULL ORDER BY i.id"
        )
        return [(int(r[0]), str(r[1]), dihedral_from_blob(r[2]) if r[2] is not None else None) for r in rows]

    def _match_images(
        self, images: Sequence[ImageHashes], matcher: HashMatcher, match_distance: int
    ) -> list[tuple[int, int, int, str]]:
        """Match images (all their dihedral hashes) against `matcher` (ids = list entry ids) and store the closest
        transform of each (image, entry) pair; a pair already stored is kept. Returns the rows found: (image id,
        entry id, distance, transform)."""
        found = match_transforms(matcher, [[pdq, *(dihedral or ())] for _, pdq, dihedral in images], match_distance)
        rows = [(img[0], hid, dist, t) for img, hits in zip(images, found, strict=True) for hid, dist, t in hits]
        self.db.table("hash_matches").insert_all(
            ({"image_id": i, "list_hash_id": h, "distance": d, "transform": t} for i, h, d, t in rows), ignore=True
        )
        return rows

    def _add_new_images(self, conn: sqlite3.Connection, images: Sequence[ImageHashes], match_distance: int) -> None:
        """New images of a write batch: store their dihedral hashes and match them against every imported list."""
        conn.executemany(
            "INSERT OR IGNORE INTO pdq_dihedral (image_id, hashes) VALUES (?, ?)",
            [(i, dihedral_blob(d)) for i, _, d in images if d],
        )
        matcher = self._hash_list_matcher(conn) if images else None
        if matcher is not None:
            self._match_images(images, matcher, match_distance)

    def dihedral_hashes(self, ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """image id -> its 7 other dihedral hashes (DIHEDRAL[1:] order); images without them are left out."""
        out: dict[int, tuple[str, ...]] = {}
        for chunk in chunks([int(i) for i in ids]):
            q = f"SELECT image_id, hashes FROM pdq_dihedral WHERE image_id IN ({marks(chunk)})"
            out.update({int(r[0]): dihedral_from_blob(r[1]) for r in self.db.execute(q, chunk)})
        return out

    def count_without_dihedral(self) -> int:
        """Images with a PDQ hash but no dihedral hashes (indexed before schema 8)."""
        q = (
            "SELECT COUNT(*) FROM images i WHERE i.pdq IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM pdq_dihedral d WHERE d.image_id = i.id)"
        )
        return int(self.db.execute(q).fetchone()[0])

    def hash_list_entries(self) -> list[tuple[int, str, str, str | None]]:
        """(entry id, hash, list name, note) of every imported entry."""
        rows = self.db.execute(
            "SELECT h.id, h.hash, l.name, h.note FROM list_hashes h JOIN hash_lists l ON l.id = h.list_id"
        ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2]), r[3]) for r in rows]

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

    # -- the lists as banks --------------------------------------------------------------------------------------------
    def hash_lists(self) -> list[dict[str, Any]]:
        """name, count and imported_at of every list, in import order (for stats)."""
        return [
            dict(zip(("name", "count", "imported_at"), r, strict=True))
            for r in self.db.execute("SELECT name, count, imported_at FROM hash_lists ORDER BY id")
        ]

    def hash_list_summaries(self, max_distance: int, name: str | None = None) -> list[HashListSummary]:
        """Every list (or the one named: NotFound if there is none), in import order, with the stored images that
        match it within `max_distance` (by the transform of each image's closest match in the list)."""
        q = "SELECT id, name, count, imported_at, imported_by, source, bad_lines FROM hash_lists"
        rows = self.db.execute(
            q + (" WHERE name = ?" if name is not None else "") + " ORDER BY id", ([name] if name is not None else [])
        ).fetchall()
        if name is not None and not rows:
            raise NotFound(
                f"no hash list named {name!r} in the store at {self.root}; `nsfw-index hash-lists list` shows them"
            )
        # per list and image, the closest match's transform (original first on a tie, as DIHEDRAL orders them)
        by_list: dict[int, dict[int, tuple[int, int]]] = {int(r[0]): {} for r in rows}
        match_q = (
            "SELECT h.list_id, m.image_id, m.distance, m.transform FROM hash_matches m "
            "JOIN list_hashes h ON h.id = m.list_hash_id WHERE m.distance <= ?"
        )
        args: list[Any] = [max_distance]
        if name is not None:
            match_q += " AND h.list_id = ?"
            args.append(int(rows[0][0]))
        order = {t: i for i, t in enumerate(DIHEDRAL)}
        for list_id, image_id, distance, transform in self.db.execute(match_q, args):
            seen = by_list.get(int(list_id))
            if seen is None:
                continue
            key = (int(distance), order.get(str(transform), len(order)))
            if image_id not in seen or key < seen[image_id]:
                seen[image_id] = key
        out = []
        for r in rows:
            matches = by_list[int(r[0])]
            counts: dict[str, int] = {}
            for _, t in matches.values():
                counts[DIHEDRAL[t]] = counts.get(DIHEDRAL[t], 0) + 1
            out.append(
                HashListSummary(
                    name=str(r[1]),
                    list_id=int(r[0]),
                    entries=int(r[2]),
                    imported_at=str(r[3]),
                    imported_by=r[4],
                    source=r[5],
                    bad_lines=int(r[6]),
                    matched_images=len(matches),
                    matched_by_transform={t: counts[t] for t in DIHEDRAL if t in counts},
                )
            )
        return out

    def hash_list_events(self, name: str) -> list[HashListEvent]:
        """What was done to lists of this name, oldest first (deleted ones' too)."""
        cur = self.db.execute(f"SELECT {_EVENT_COLUMNS} FROM hash_list_events WHERE list = ? ORDER BY id", [name])
        return [_event(r) for r in cur]

    def hash_list_version(self) -> int:
        """The latest hash-list event's id: changes with every import, replace and delete."""
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM hash_list_events").fetchone()[0])

    def hash_list_hashes(self, name: str) -> list[tuple[str, str | None]]:
        """(hash, note) of every entry of the list, in import order; NotFound if there is no such list."""
        row = self.db.execute("SELECT id FROM hash_lists WHERE name = ?", [name]).fetchone()
        if row is None:
            raise NotFound(
                f"no hash list named {name!r} in the store at {self.root}; `nsfw-index hash-lists list` shows them"
            )
        cur = self.db.execute("SELECT hash, note FROM list_hashes WHERE list_id = ? ORDER BY id", [row[0]])
        return [(str(r[0]), r[1]) for r in cur]

    def list_matched_images(self, name: str, max_distance: int) -> set[int]:
        """Images with a match within `max_distance` in the named list."""
        q = (
            "SELECT DISTINCT m.image_id FROM hash_matches m JOIN list_hashes h ON h.id = m.list_hash_id "
            "JOIN hash_lists l ON l.id = h.list_id WHERE l.name = ? AND m.distance <= ?"
        )
        return {int(r[0]) for r in self.db.execute(q, [name, max_distance])}

    def delete_hash_list(self, name: str, who: str, reason: str | None) -> tuple[int, HashListEvent]:
        """Delete the list, its entries and their matches in one transaction, recording who did it and why (the
        event log keeps the list's history). Returns (entries removed, the delete event); NotFound if none."""
        with self.transaction() as conn:
            row = conn.execute("SELECT id FROM hash_lists WHERE name = ?", [name]).fetchone()
            if row is None:
                raise NotFound(
                    f"no hash list named {name!r} in the store at {self.root}; `nsfw-index hash-lists list` shows "
                    "them; nothing was deleted"
                )
            removed = self._count_entries(conn, int(row[0]))
            self._drop_list(conn, int(row[0]))
            event_id = self._add_event(conn, name, "delete", who, utcnow(), 0, removed, None, reason)
            got = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM hash_list_events WHERE id = ?", [event_id]).fetchone()
        return removed, _event(got)

    def _drop_list(self, conn: sqlite3.Connection, list_id: int) -> None:
        conn.execute(
            "DELETE FROM hash_matches WHERE list_hash_id IN (SELECT id FROM list_hashes WHERE list_id = ?)", [list_id]
        )
        conn.execute("DELETE FROM list_hashes WHERE list_id = ?", [list_id])
        conn.execute("DELETE FROM hash_lists WHERE id = ?", [list_id])

    def _count_entries(self, conn: sqlite3.Connection, list_id: int) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM list_hashes WHERE list_id = ?", [list_id]).fetchone()[0])

    def _add_event(
        self,
        conn: sqlite3.Connection,
        name: str,
        action: str,
        who: str,
        at: str,
        entries: int,
        changed: int,
        source: str | None,
        reason: str | None,
    ) -> int:
        cur = conn.execute(
            "INSERT INTO hash_list_events (list, action, who, at, entries, changed, source, reason) "
            "VALUES (?,?,?,?,?,?,?,?)",
            [name, action, who, at, entries, changed, source, reason],
        )
        return int(cur.lastrowid or 0)
