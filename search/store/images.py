"""The image tables' SQL (images, paths, errors): batches, prune, forgetting one image, external ids, rows, vectors."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from search.answers import ImageRow
from search.errors import NotFound
from search.store.hashlists import HashListTables
from search.store.rows import IMAGE_COLUMNS, ImageRecord, blob, image_row, utcnow, vectors_from_blobs
from search.store.sql import chunks, marks
from search.store.thumbnails import insert_thumbnails

_INSERT_IMAGE = (
    "INSERT OR IGNORE INTO images (sha256, size, width, height, format, p_neutral, p_low, p_medium, p_high, "
    "s_neutral, s_low, s_medium, s_high, level, embedding, pdq, pdq_quality, run_id, indexed_at)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_UPSERT_PATH = (
    "INSERT INTO paths (path, image_id, size, mtime_ns, run_id, seen_at) VALUES (?,?,?,?,?,?) "
    "ON CONFLICT(path) DO UPDATE SET image_id=excluded.image_id, size=excluded.size, "
    "mtime_ns=excluded.mtime_ns, run_id=excluded.run_id, seen_at=excluded.seen_at"
)


#: A file that failed: path, reason, kind, and the size and mtime_ns it had (None: unknown, it is always retried).
ErrorRow = tuple[str, str, str, int | None, int | None]


class ImageTables(HashListTables):
    """Mixin of `Store`: images keyed by content sha256, the paths that hold them, and per-path errors."""

    # -- writing --
    def write_batch(
        self,
        run_id: int,
        images: Sequence[ImageRecord],
        paths: Sequence[tuple[str, str, int | None, int | None]],
        errors: Sequence[ErrorRow] = (),
        *,
        match_distance: int = 64,
    ) -> dict[str, int]:
        """Insert new images, then point paths (path, sha256, size, mtime_ns) at them, in one transaction.

        Returns sha256 -> id for every sha the batch touched. Idempotent: an image whose sha is already stored is
        not written again. A path that now holds other content is re-pointed; successful paths lose their error; a
        path that fails now no longer points at its old content. New images keep their dihedral PDQ hashes, and each
        of those is matched against every imported PDQ hash list (up to `match_distance`) read inside the same
        transaction: a crash never leaves an image without its matches, and a list imported while an index run goes
        on is never missed (the import matches what was committed before it, this matches what the import
        committed).
        """
        now = utcnow()
        with self.transaction() as conn:
            conn.executemany(
                _INSERT_IMAGE,
                [
                    [
                        *(r.sha256, r.size, r.width, r.height, r.format),
                        *map(float, r.probabilities),
                        *map(float, r.scores),
                        *(r.level, blob(r.embedding), r.pdq, r.pdq_quality, run_id, now),
                    ]
                    for r in images
                ],
            )
            ids = self.ids_by_sha({r.sha256 for r in images} | {p[1] for p in paths})
            insert_thumbnails(conn, [(ids[r.sha256], r.thumbnail) for r in images if r.thumbnail is not None])
            touched: set[int] = set()  # images that may have lost their last path
            for path, *_ in [*paths, *errors]:
                row = conn.execute("SELECT image_id FROM paths WHERE path = ?", [path]).fetchone()
                if row:
                    touched.add(int(row[0]))
            for path, sha, size, mtime_ns in paths:
                if sha not in ids:
                    raise NotFound(f"internal: path {path} points at sha256 {sha} that is not stored")
                conn.execute(_UPSERT_PATH, [path, ids[sha], size, mtime_ns, run_id, now])
                conn.execute("DELETE FROM errors WHERE path = ?", [path])
            # their dihedral PDQ hashes, and matches of any of them against every imported list
            self._add_new_images(
                conn, [(ids[r.sha256], r.pdq, r.pdq_dihedral) for r in images if r.pdq], match_distance
            )
            for path, reason, kind, size, mtime_ns in errors:
                conn.execute("DELETE FROM paths WHERE path = ?", [path])
                conn.execute(
                    "INSERT OR REPLACE INTO errors (path, reason, kind, run_id, at, size, mtime_ns)"
                    " VALUES (?,?,?,?,?,?,?)",
                    [path, reason, kind, run_id, now, size, mtime_ns],
                )
            if touched:  # content that lost its last path by being overwritten is dropped like a pruned one
                self._drop_orphans(conn, touched)
        return ids

    def _drop_orphans(self, conn: sqlite3.Connection, candidates: set[int] | None = None) -> int:
        """Delete images no path points at (among `candidates`, or all); bumps the deletion epoch."""
        q = "SELECT id FROM images WHERE NOT EXISTS (SELECT 1 FROM paths WHERE paths.image_id = images.id)"
        if candidates is None:
            orphans = [r[0] for r in conn.execute(q)]
        else:
            orphans = [
                i
                for i in candidates
                if not conn.execute("SELECT 1 FROM paths WHERE image_id = ? LIMIT 1", [i]).fetchone()
            ]
        if orphans:
            for chunk in chunks(orphans):
                conn.execute(f"DELETE FROM hash_matches WHERE image_id IN ({marks(chunk)})", chunk)
                conn.execute(f"DELETE FROM images WHERE id IN ({marks(chunk)})", chunk)
            # derived indexes compare this epoch and rebuild: deletions are rare, rebuilding is always right
            epoch = self.get_info("deletion_epoch", 0) + 1
            conn.execute(
                "INSERT OR REPLACE INTO store_info (key, value) VALUES ('deletion_epoch', ?)", [json.dumps(epoch)]
            )
        return len(orphans)

    def prune(self, keep: set[str], under: Sequence[str] | None = None) -> tuple[int, int]:
        """Drop paths not in `keep` below one of `under` (None: anywhere). Returns (paths, images) dropped."""
        with self.transaction() as conn:
            gone = [p for (p,) in conn.execute("SELECT path FROM paths") if p not in keep and _below(p, under)]
            for chunk in chunks(gone):
                conn.execute(f"DELETE FROM paths WHERE path IN ({marks(chunk)})", chunk)
            stale = [p for (p,) in conn.execute("SELECT path FROM errors") if p not in keep and _below(p, under)]
            for chunk in chunks(stale):
                conn.execute(f"DELETE FROM errors WHERE path IN ({marks(chunk)})", chunk)
            images = self._drop_orphans(conn)
        return len(gone), images

    def forget_all_paths(self) -> int:
        """Drop every path, error and (so) image, in one transaction, before re-embedding everything (`--rebuild`).
        Labels and hash lists stay: they are keyed by content. Returns the images dropped."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM paths")
            conn.execute("DELETE FROM errors")
            return self._drop_orphans(conn)

    # -- external ids (a caller's own id for an image: at most one each way) --
    def external_ids(self, ids: Sequence[int]) -> dict[int, str | None]:
        """Every given id that is stored -> its external id (None: it has none)."""
        out: dict[int, str | None] = {}
        for chunk in chunks([int(i) for i in ids]):
            q = f"SELECT id, external_id FROM images WHERE id IN ({marks(chunk)})"
            out.update({int(r[0]): r[1] for r in self.db.execute(q, chunk)})
        return out

    def image_by_external_id(self, external_id: str) -> int | None:
        row = self.db.execute("SELECT id FROM images WHERE external_id = ?", [external_id]).fetchone()
        return int(row[0]) if row else None

    def set_external_id(self, image_id: int, external_id: str) -> int | None:
        """Give image `image_id` the external id, unless it has another one or another image holds this one.
        Returns None when done (or already so), else the id of the image that holds `external_id` (possibly
        `image_id` itself with another one: compare `external_ids`). NotFound for an unknown image."""
        with self.transaction() as conn:
            row = conn.execute("SELECT external_id FROM images WHERE id = ?", [image_id]).fetchone()
            if row is None:
                raise NotFound(f"no image with id {image_id} in the store at {self.root}")
            if row[0] == external_id:
                return None
            holder = conn.execute("SELECT id FROM images WHERE external_id = ?", [external_id]).fetchone()
            if holder is not None:
                return int(holder[0])
            if row[0] is not None:
                return image_id
            conn.execute("UPDATE images SET external_id = ? WHERE id = ?", [external_id, image_id])
        return None

    # -- forgetting one image (the audit record is a run of kind 'forget') --
    def forget_image(self, image_id: int, *, who: str) -> dict[str, Any]:
        """Remove one image in one transaction: its paths, cluster memberships, hash-list matches, the row (its
        thumbnails go with it: a trigger) and so its vector (the deletion epoch moves: FAISS files are stale until
        rewritten). Label events stay (keyed by content). The removal is recorded as a run of kind `forget` (id,
        sha256, external id, who) in the same transaction. Returns that record with the counts."""
        now = utcnow()
        with self.transaction() as conn:
            row = conn.execute("SELECT sha256, external_id FROM images WHERE id = ?", [image_id]).fetchone()
            if row is None:
                raise NotFound(f"no image with id {image_id} in the store at {self.root}")
            sha256, external_id = str(row[0]), row[1]
            paths = conn.execute("DELETE FROM paths WHERE image_id = ?", [image_id]).rowcount
            conn.execute("DELETE FROM cluster_members WHERE image_id = ?", [image_id])
            self._drop_orphans(conn, {image_id})
            labels = int(conn.execute("SELECT COUNT(*) FROM labels WHERE sha256 = ?", [sha256]).fetchone()[0])
            args = {"id": image_id, "sha256": sha256, "external_id": external_id, "who": who}
            counts = {"images": 1, "paths": paths, "label_events_kept": labels}
            cur = conn.execute(
                "INSERT INTO runs (kind, started_at, finished_at, status, args, counts, timings)"
                " VALUES ('forget', ?, ?, 'done', ?, ?, '{}')",
                [now, now, json.dumps(args), json.dumps(counts)],
            )
        return {**args, **counts, "run_id": int(cur.lastrowid or 0), "at": now}

    def forgotten(self, key: str, value: int | str) -> dict[str, Any] | None:
        """The latest `forget` run that removed the image whose `key` (id, sha256 or external_id) was `value`."""
        if key not in ("id", "sha256", "external_id"):
            raise ValueError(key)
        row = self.db.execute(
            f"SELECT id, args, finished_at FROM runs WHERE kind = 'forget' AND json_extract(args, '$.{key}') = ?"
            " ORDER BY id DESC LIMIT 1",
            [value],
        ).fetchone()
        return {**json.loads(row[1]), "run_id": int(row[0]), "at": row[2]} if row else None

    # -- paths --
    def path_state(self, path: str) -> tuple[int, int, int] | None:
        """(size, mtime_ns, image_id) recorded for a path, or None."""
        row = self.db.execute("SELECT size, mtime_ns, image_id FROM paths WHERE path = ?", [path]).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def all_path_states(self) -> dict[str, tuple[int, int, int]]:
        return {r[0]: (r[1], r[2], r[3]) for r in self.db.execute("SELECT path, size, mtime_ns, image_id FROM paths")}

    def paths_of(self, ids: Sequence[int]) -> dict[int, list[str]]:
        """Every given id -> its stored paths, sorted (possibly [])."""
        out: dict[int, list[str]] = {int(i): [] for i in ids}
        for chunk in chunks(list(out)):
            for image_id, path in self.db.execute(
                f"SELECT image_id, path FROM paths WHERE image_id IN ({marks(chunk)}) ORDER BY path", chunk
            ):
                out[image_id].append(path)
        return out

    # -- ids and rows --
    def ids_by_sha(self, shas: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in chunks(list(shas)):
            q = f"SELECT sha256, id FROM images WHERE sha256 IN ({marks(chunk)})"
            out.update({r[0]: r[1] for r in self.db.execute(q, chunk)})
        return out

    def max_image_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0])

    def count_images(self, max_id: int | None = None) -> int:
        if max_id is None:
            return int(self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM images WHERE id <= ?", [max_id]).fetchone()[0])

    def images(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        """Rows (no embedding) by id, for answers; missing ids are left out."""
        out: dict[int, ImageRow] = {}
        for chunk in chunks([int(i) for i in ids]):
            cur = self.db.execute(f"SELECT {IMAGE_COLUMNS} FROM images WHERE id IN ({marks(chunk)})", chunk)
            cols = [d[0] for d in cur.description]
            for row in cur:
                out[row[0]] = image_row(dict(zip(cols, row, strict=True)))
        return out

    def image(self, image_id: int) -> ImageRow:
        got = self.images([image_id])
        if image_id not in got:
            raise NotFound(f"no image with id {image_id} in the store at {self.root}")
        return got[image_id]

    def resolve_image(self, ref: str) -> int:
        """An image id, a stored path (or a path that resolves to one) or a sha256 -> image id."""
        ref = ref.strip()
        if ref.isdigit():
            row = self.db.execute("SELECT id FROM images WHERE id = ?", [int(ref)]).fetchone()
            if row:
                return int(row[0])
        if len(ref) == 64 and all(c in "0123456789abcdefABCDEF" for c in ref):
            row = self.db.execute("SELECT id FROM images WHERE sha256 = ?", [ref.lower()]).fetchone()
            if row:
                return int(row[0])
        for candidate in dict.fromkeys([ref, str(Path(ref).expanduser().resolve())]):
            row = self.db.execute("SELECT image_id FROM paths WHERE path = ?", [candidate]).fetchone()
            if row:
                return int(row[0])
        raise NotFound(f"{ref!r} is not an image id, sha256 or indexed path of the store at {self.root}")

    # -- vectors --
    def iter_vectors(
        self, after_id: int = 0, upto_id: int | None = None, chunk: int = 20000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, vectors float32) in id order, in chunks."""
        dim = self.embedding_dim()
        last = after_id
        while True:
            q = "SELECT id, embedding FROM images WHERE id > ?" + (" AND id <= ?" if upto_id is not None else "")
            args: list[Any] = [last] + ([upto_id] if upto_id is not None else [])
            rows = self.db.execute(q + " ORDER BY id LIMIT ?", [*args, chunk]).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, vectors_from_blobs([r[1] for r in rows], dim)
            last = int(ids[-1])

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The embeddings of `ids`, in that order (NotFound names the first missing id)."""
        dim = self.embedding_dim()
        found: dict[int, bytes] = {}
        ids = [int(i) for i in ids]
        for chunk in chunks(ids):
            for r in self.db.execute(f"SELECT id, embedding FROM images WHERE id IN ({marks(chunk)})", chunk):
                found[r[0]] = r[1]
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(f"no image with id {missing[0]} in the store")
        return vectors_from_blobs([found[i] for i in ids], dim)


def _below(path: str, roots: Sequence[str] | None) -> bool:
    """Is `path` one of `roots` or inside one (a directory, or a tar shard's members)? None covers everything."""
    if roots is None:
        return True
    return any(path == r or path.startswith(r.rstrip("/") + "/") or path.startswith(r + "::") for r in roots)
