"""The store directory: `meta.sqlite` (WAL, numbered migrations) as the source of truth, and the writer lock."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from search.errors import ModelMismatch, NotFound, StoreCorrupt, StoreLocked, StoreNotFound
from search.pdq import HashMatcher
from search.store.clusters import ClusterTables
from search.settings import LEVELS, Settings

DB_FILE = "meta.sqlite"
LOCK_FILE = "writer.lock"
SOURCES = ("human", "hash_list", "model")
LABELS = ("unsafe", "safe", "clear")


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


# Numbered migrations, applied in order on open; PRAGMA user_version holds the last applied number.
MIGRATIONS: list[str] = [
    # 1: the base schema
    """
    CREATE TABLE store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT,
        status TEXT NOT NULL, args TEXT, counts TEXT, timings TEXT
    );
    -- AUTOINCREMENT: an id is never reused after its image is dropped (API clients and clusters hold ids)
    CREATE TABLE images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sha256 TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, format TEXT NOT NULL,
        p_neutral REAL NOT NULL, p_low REAL NOT NULL, p_medium REAL NOT NULL, p_high REAL NOT NULL,
        s_neutral REAL NOT NULL, s_low REAL NOT NULL, s_medium REAL NOT NULL, s_high REAL NOT NULL,
        level TEXT NOT NULL,
        embedding BLOB NOT NULL,
        pdq TEXT, pdq_quality INTEGER,
        run_id INTEGER REFERENCES runs(id), indexed_at TEXT NOT NULL
    );
    CREATE TABLE paths (
        path TEXT PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id),
        size INTEGER, mtime_ns INTEGER, run_id INTEGER, seen_at TEXT NOT NULL
    );
    CREATE INDEX paths_image_id ON paths(image_id);
    CREATE TABLE errors (
        path TEXT PRIMARY KEY, reason TEXT NOT NULL, kind TEXT NOT NULL, run_id INTEGER, at TEXT NOT NULL
    );
    -- labels are an append-only event log keyed by content, so that they survive a prune and a re-add
    CREATE TABLE labels (
        id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, label TEXT NOT NULL CHECK (label IN ('unsafe', 'safe', 'clear')),
        who TEXT NOT NULL, at TEXT NOT NULL, reason TEXT
    );
    CREATE INDEX labels_sha256 ON labels(sha256, id);
    CREATE TRIGGER labels_no_update BEFORE UPDATE ON labels
        BEGIN SELECT RAISE(ABORT, 'labels are append-only: add a new event instead'); END;
    CREATE TRIGGER labels_no_delete BEFORE DELETE ON labels
        BEGIN SELECT RAISE(ABORT, 'labels are append-only: add a clear event instead'); END;
    CREATE VIEW current_labels AS
        SELECT l.sha256, l.label, l.who, l.at, l.reason, l.id AS event_id FROM labels l
        JOIN (SELECT sha256, MAX(id) AS mid FROM labels GROUP BY sha256) m ON l.id = m.mid;
    CREATE TABLE hash_lists (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, source TEXT, imported_at TEXT NOT NULL,
        count INTEGER NOT NULL, bad_lines INTEGER NOT NULL
    );
    CREATE TABLE list_hashes (
        id INTEGER PRIMARY KEY, list_id INTEGER NOT NULL REFERENCES hash_lists(id), hash TEXT NOT NULL,
        UNIQUE (list_id, hash)
    );
    CREATE TABLE hash_matches (
        image_id INTEGER NOT NULL, list_hash_id INTEGER NOT NULL, distance INTEGER NOT NULL,
        PRIMARY KEY (image_id, list_hash_id)
    );
    CREATE INDEX hash_matches_list ON hash_matches(list_hash_id);
    """,
    # 2: near-duplicate groups and k-means clusters (search/clusters.py). `clusterings` keeps one row per run;
    # `clusters` and `cluster_members` hold only the latest result, replaced in one transaction. Cluster ids come
    # from AUTOINCREMENT, so an id is never reused by a later run. No foreign key to images: a prune may delete
    # members, which readers then leave out (the result is marked stale).
    """
    CREATE TABLE clusterings (
        id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, run_id INTEGER,
        threshold REAL NOT NULL, k INTEGER NOT NULL, k_requested INTEGER,
        watermark INTEGER NOT NULL, images INTEGER NOT NULL, deletion_epoch INTEGER NOT NULL,
        method TEXT NOT NULL, params TEXT NOT NULL, timings TEXT NOT NULL,
        groups INTEGER NOT NULL, grouped_images INTEGER NOT NULL, clusters INTEGER NOT NULL
    );
    CREATE TABLE clusters (
        id INTEGER PRIMARY KEY AUTOINCREMENT, clustering_id INTEGER NOT NULL REFERENCES clusterings(id),
        kind TEXT NOT NULL CHECK (kind IN ('group', 'cluster')), size INTEGER NOT NULL, path_count INTEGER NOT NULL,
        representative_id INTEGER NOT NULL, cohesion REAL NOT NULL, score_stats TEXT NOT NULL
    );
    CREATE INDEX clusters_kind_size ON clusters(kind, size DESC, id);
    CREATE TABLE cluster_members (
        cluster_id INTEGER NOT NULL REFERENCES clusters(id), image_id INTEGER NOT NULL, similarity REAL NOT NULL,
        PRIMARY KEY (cluster_id, image_id)
    ) WITHOUT ROWID;
    CREATE INDEX cluster_members_image ON cluster_members(image_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

IMAGE_COLUMNS = (
    "id, sha256, size, width, height, format, p_neutral, p_low, p_medium, p_high, "
    "s_neutral, s_low, s_medium, s_high, level, pdq, pdq_quality, run_id, indexed_at"
)


@dataclass
class ImageRecord:
    """One image's row, as the pipeline writes it."""

    sha256: str
    size: int
    width: int
    height: int
    format: str
    probabilities: Sequence[float]
    scores: Sequence[float]
    level: str
    embedding: np.ndarray
    pdq: str | None = None
    pdq_quality: int | None = None


def _blob(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype=np.float32).tobytes()


def vectors_from_blobs(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()


class WriterLock:
    """One writer per store: a non-blocking flock on DIR/writer.lock. Readers never take it."""

    def __init__(self, root: Path, purpose: str) -> None:
        self.path = root / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> WriterLock:
        import time

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


class Store(ClusterTables):
    """The SQLite side of a store. Cheap to open; one per thread (sqlite connections are not shared)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False, readonly: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.db_path = self.root / DB_FILE
        if not self.db_path.exists():
            if not create:
                raise StoreNotFound(
                    f"no store at {self.root} (no {DB_FILE}); "
                    f"create one with `nsfw-index index PATH --store {self.root}`"
                )
            self.root.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        self._lists_key: tuple[int, ...] | None = None
        self._lists_matcher: HashMatcher | None = None
        try:
            if readonly:
                conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False, timeout=30)
            else:
                conn = sqlite3.connect(self.db_path, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA busy_timeout = 30000")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self.db = sqlite_utils.Database(conn)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreCorrupt(f"{self.db_path} is not a readable nsfw-index store ({e})") from e

    # -- schema --
    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreCorrupt(
                f"{self.db_path} has schema version {version}, newer than this nsfw-index ({SCHEMA_VERSION}); upgrade"
            )
        if version == SCHEMA_VERSION:
            return
        conn = self.db.conn
        if self.readonly:  # migrate through a short-lived writable connection, then keep reading read-only
            try:
                conn = sqlite3.connect(self.db_path, timeout=30)
            except sqlite3.Error as e:
                raise StoreCorrupt(
                    f"{self.db_path} needs schema migrations {version + 1}..{SCHEMA_VERSION} and "
                    f"cannot be opened for writing ({e}); run any writing verb once"
                ) from e
        try:
            self._apply(conn, version)
        finally:
            if conn is not self.db.conn:
                conn.close()
        if not self.readonly:
            self.set_info("schema_version", SCHEMA_VERSION)

    @staticmethod
    def _apply(conn: sqlite3.Connection, version: int) -> None:
        """Each migration and its version bump commit together; concurrent openers serialise on BEGIN IMMEDIATE
        and skip what another process applied meanwhile."""
        for number in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] < number:
                    for statement in _statements(MIGRATIONS[number - 1]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def writer_lock(self, purpose: str) -> WriterLock:
        return WriterLock(self.root, purpose)

    # -- store info --
    def get_info(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM store_info WHERE key = ?", [key]).fetchone()
        return json.loads(row[0]) if row else default

    def set_info(self, key: str, value: Any) -> None:
        with self.db.conn:
            self.db.execute("INSERT OR REPLACE INTO store_info (key, value) VALUES (?, ?)", [key, json.dumps(value)])

    def model_identity(self) -> dict[str, Any] | None:
        info = self.get_info("model")
        return dict(info) if info else None

    def check_model(self, identity: dict[str, Any], *, adopt: bool = False) -> None:
        """Refuse vectors of another model. An empty store adopts the identity; `adopt` replaces it (rebuild)."""
        current = self.model_identity()
        if current is None or adopt:
            self.set_info(
                "model", {k: identity[k] for k in ("architecture", "weights_sha256", "preprocessing", "embedding_dim")}
            )
            return
        diffs = [
            f"{k}: store has {current.get(k)!r}, model has {identity.get(k)!r}"
            for k in ("architecture", "weights_sha256", "preprocessing", "embedding_dim")
            if current.get(k) != identity.get(k)
        ]
        if diffs:
            raise ModelMismatch(
                f"the store at {self.root} was built with another model ("
                + "; ".join(diffs)
                + "). Use the same --model, or re-embed everything with `nsfw-index index ... --rebuild`"
            )

    def embedding_dim(self) -> int:
        ident = self.model_identity()
        if ident is None:
            raise StoreNotFound(f"the store at {self.root} has no images yet; index some first")
        return int(ident["embedding_dim"])

    # -- runs --
    def begin_run(self, kind: str, args: dict[str, Any]) -> int:
        with self.db.conn:
            # a run left 'running' by a killed writer is marked, now that we hold the lock
            self.db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
            cur = self.db.execute(
                "INSERT INTO runs (kind, started_at, status, args) VALUES (?, ?, 'running', ?)",
                [kind, utcnow(), json.dumps(args, default=str)],
            )
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, status: str, counts: dict[str, Any], timings: dict[str, Any]) -> None:
        with self.db.conn:
            self.db.execute(
                "UPDATE runs SET finished_at = ?, status = ?, counts = ?, timings = ? WHERE id = ?",
                [utcnow(), status, json.dumps(counts), json.dumps(timings), run_id],
            )

    # -- images and paths --
    def path_state(self, path: str) -> tuple[int, int, int] | None:
        """(size, mtime_ns, image_id) recorded for a path, or None."""
        row = self.db.execute("SELECT size, mtime_ns, image_id FROM paths WHERE path = ?", [path]).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def all_path_states(self) -> dict[str, tuple[int, int, int]]:
        return {r[0]: (r[1], r[2], r[3]) for r in self.db.execute("SELECT path, size, mtime_ns, image_id FROM paths")}

    def ids_by_sha(self, shas: Iterable[str]) -> dict[str, int]:
        shas = list(shas)
        out: dict[str, int] = {}
        for i in range(0, len(shas), 500):
            chunk = shas[i : i + 500]
            q = f"SELECT sha256, id FROM images WHERE sha256 IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: r[1] for r in self.db.execute(q, chunk)})
        return out

    def write_batch(
        self,
        run_id: int,
        images: Sequence[ImageRecord],
        paths: Sequence[tuple[str, str, int | None, int | None]],
        errors: Sequence[tuple[str, str, str]] = (),
        *,
        match_distance: int = 64,
    ) -> dict[str, int]:
        """Insert new images, then point paths (path, sha256, size, mtime_ns) at them, in one transaction.

        Returns sha256 -> id for every sha the batch touched. Idempotent: an image whose sha is already stored is
        not written again. A path that now holds other content is re-pointed; successful paths lose their error; a
        path that fails now no longer points at its old content. New images are matched against every imported PDQ
        hash list (up to `match_distance`) read inside the same transaction: a crash never leaves an image without
        its matches, and a list imported while an index run goes on is never missed (the import matches what was
        committed before it, this matches what the import committed).
        """
        now = utcnow()
        with self.transaction() as conn:
            for r in images:
                conn.execute(
                    "INSERT OR IGNORE INTO images (sha256, size, width, height, format, p_neutral, p_low, p_medium, "
                    "p_high, s_neutral, s_low, s_medium, s_high, level, embedding, pdq, pdq_quality, run_id, "
                    "indexed_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        r.sha256,
                        r.size,
                        r.width,
                        r.height,
                        r.format,
                        *map(float, r.probabilities),
                        *map(float, r.scores),
                        r.level,
                        _blob(r.embedding),
                        r.pdq,
                        r.pdq_quality,
                        run_id,
                        now,
                    ],
                )
            shas = {r.sha256 for r in images} | {p[1] for p in paths}
            ids = self.ids_by_sha(shas)
            touched: set[int] = set()  # images that may have lost their last path
            for path, *_ in [*paths, *errors]:
                row = conn.execute("SELECT image_id FROM paths WHERE path = ?", [path]).fetchone()
                if row:
                    touched.add(int(row[0]))
            for path, sha, size, mtime_ns in paths:
                if sha not in ids:
                    raise NotFound(f"internal: path {path} points at sha256 {sha} that is not stored")
                conn.execute(
                    "INSERT INTO paths (path, image_id, size, mtime_ns, run_id, seen_at) VALUES (?,?,?,?,?,?) "
                    "ON CONFLICT(path) DO UPDATE SET image_id=excluded.image_id, size=excluded.size, "
                    "mtime_ns=excluded.mtime_ns, run_id=excluded.run_id, seen_at=excluded.seen_at",
                    [path, ids[sha], size, mtime_ns, run_id, now],
                )
                conn.execute("DELETE FROM errors WHERE path = ?", [path])
            matcher = self._hash_list_matcher(conn) if any(r.pdq for r in images) else None
            if matcher is not None:
                new = [(r, r.pdq) for r in images if r.pdq]
                for (r, _), found in zip(new, matcher.match([h for _, h in new], match_distance), strict=True):
                    conn.executemany(
                        "INSERT OR IGNORE INTO hash_matches (image_id, list_hash_id, distance) VALUES (?,?,?)",
                        [(ids[r.sha256], hid, dist) for hid, dist in found],
                    )
            for path, reason, kind in errors:
                conn.execute("DELETE FROM paths WHERE path = ?", [path])
                conn.execute(
                    "INSERT OR REPLACE INTO errors (path, reason, kind, run_id, at) VALUES (?,?,?,?,?)",
                    [path, reason, kind, run_id, now],
                )
            if touched:  # content that lost its last path by being overwritten is dropped like a pruned one
                self._drop_orphans(conn, touched)
        return ids

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

    def _drop_orphans(self, conn: sqlite3.Connection, candidates: set[int] | None = None) -> int:
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
            for i in range(0, len(orphans), 500):
                chunk = orphans[i : i + 500]
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM hash_matches WHERE image_id IN ({marks})", chunk)
                conn.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
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
            for i in range(0, len(gone), 500):
                chunk = gone[i : i + 500]
                conn.execute(f"DELETE FROM paths WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            stale_errors = [p for (p,) in conn.execute("SELECT path FROM errors") if p not in keep and _below(p, under)]
            for i in range(0, len(stale_errors), 500):
                chunk = stale_errors[i : i + 500]
                conn.execute(f"DELETE FROM errors WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            images = self._drop_orphans(conn)
        return len(gone), images

    def deletion_epoch(self) -> int:
        return int(self.get_info("deletion_epoch", 0))

    def max_image_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0])

    def count_images(self, max_id: int | None = None) -> int:
        if max_id is None:
            return int(self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM images WHERE id <= ?", [max_id]).fetchone()[0])

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
        dim = self.embedding_dim()
        found: dict[int, bytes] = {}
        ids = [int(i) for i in ids]
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for r in self.db.execute(
                f"SELECT id, embedding FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ):
                found[r[0]] = r[1]
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(f"no image with id {missing[0]} in the store")
        return vectors_from_blobs([found[i] for i in ids], dim)

    def images(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Rows (no embedding) by id, for answers; missing ids are left out."""
        out: dict[int, dict[str, Any]] = {}
        ids = [int(i) for i in ids]
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            cur = self.db.execute(
                f"SELECT {IMAGE_COLUMNS} FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
            cols = [d[0] for d in cur.description]
            for row in cur:
                out[row[0]] = image_row_to_dict(dict(zip(cols, row, strict=True)))
        return out

    def image(self, image_id: int) -> dict[str, Any]:
        got = self.images([image_id])
        if image_id not in got:
            raise NotFound(f"no image with id {image_id} in the store at {self.root}")
        return got[image_id]

    def paths_of(self, ids: Sequence[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {int(i): [] for i in ids}
        ids = list(out)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for image_id, path in self.db.execute(
                f"SELECT image_id, path FROM paths WHERE image_id IN ({','.join('?' * len(chunk))}) ORDER BY path",
                chunk,
            ):
                out[image_id].append(path)
        return out

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

    # -- labels --
    def label_history(self, image_id: int) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT l.id, l.label, l.who, l.at, l.reason FROM labels l JOIN images i ON i.sha256 = l.sha256 "
            "WHERE i.id = ? ORDER BY l.id",
            [image_id],
        )
        return [dict(zip(("event", "label", "who", "at", "reason"), r, strict=True)) for r in cur]

    def current_labels(self, ids: Sequence[int] | None = None) -> dict[int, str]:
        q = "SELECT i.id, c.label FROM current_labels c JOIN images i ON i.sha256 = c.sha256 WHERE c.label != 'clear'"
        rows = self.db.execute(q).fetchall()
        out = {int(r[0]): r[1] for r in rows}
        if ids is not None:
            wanted = set(int(i) for i in ids)
            out = {k: v for k, v in out.items() if k in wanted}
        return out

    def known_unsafe(self, settings: Settings) -> dict[int, list[str]]:
        """id -> sources (human, hash_list, model) for every known-unsafe image, per DESIGN.md."""
        labels = self.current_labels()
        out: dict[int, list[str]] = {}
        for image_id, label in labels.items():
            if label == "unsafe":
                out.setdefault(image_id, []).append("human")
        for (image_id,) in self.db.execute(
            "SELECT DISTINCT image_id FROM hash_matches WHERE distance <= ?", [settings.pdq_max_distance]
        ):
            if labels.get(image_id) != "safe":
                out.setdefault(image_id, []).append("hash_list")
        col = f"s_{settings.nsfw_level}"
        for (image_id,) in self.db.execute(f"SELECT id FROM images WHERE {col} >= ?", [settings.nsfw_threshold]):
            if labels.get(image_id) != "safe":
                out.setdefault(image_id, []).append("model")
        return {k: sorted(v, key=SOURCES.index) for k, v in out.items()}

    def sources_of(self, ids: Sequence[int], settings: Settings) -> dict[int, list[str]]:
        """Known-unsafe sources for a few ids (empty list: not known-unsafe)."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        labels = self.current_labels(ids)
        hashed = {
            r[0]
            for r in self.db.execute(
                f"SELECT DISTINCT image_id FROM hash_matches WHERE distance <= ? AND image_id IN ({marks})",
                [settings.pdq_max_distance, *ids],
            )
        }
        col = f"s_{settings.nsfw_level}"
        model = {
            r[0]
            for r in self.db.execute(
                f"SELECT id FROM images WHERE {col} >= ? AND id IN ({marks})", [settings.nsfw_threshold, *ids]
            )
        }
        out: dict[int, list[str]] = {}
        for i in ids:
            s = []
            if labels.get(i) == "unsafe":
                s.append("human")
            if labels.get(i) != "safe":
                if i in hashed:
                    s.append("hash_list")
                if i in model:
                    s.append("model")
            out[i] = s
        return out

    # -- errors and stats --
    def errors(self, limit: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT path, reason, kind, run_id, at FROM errors ORDER BY path" + (
            f" LIMIT {int(limit)}" if limit else ""
        )
        return [dict(zip(("path", "reason", "kind", "run_id", "at"), r, strict=True)) for r in self.db.execute(q)]

    def counts(self, settings: Settings) -> dict[str, Any]:
        images = self.count_images()
        paths = int(self.db.execute("SELECT COUNT(*) FROM paths").fetchone()[0])
        dup_images = int(
            self.db.execute(
                "SELECT COUNT(*) FROM (SELECT image_id FROM paths GROUP BY image_id HAVING COUNT(*) > 1)"
            ).fetchone()[0]
        )
        errors = int(self.db.execute("SELECT COUNT(*) FROM errors").fetchone()[0])
        levels = {lv: 0 for lv in LEVELS}
        for lv, n in self.db.execute("SELECT level, COUNT(*) FROM images GROUP BY level"):
            levels[lv] = int(n)
        unsafe = self.known_unsafe(settings)
        by_source = {s: sum(1 for v in unsafe.values() if s in v) for s in SOURCES}
        return {
            "images": images,
            "paths": paths,
            "exact_duplicates": {"images": dup_images, "extra_paths": paths - images},
            "errors": errors,
            "levels": levels,
            "known_unsafe": {"total": len(unsafe), **by_source},
            "labels": {
                lab: n for lab, n in self.db.execute("SELECT label, COUNT(*) FROM current_labels GROUP BY label")
            },
            "hash_lists": [
                dict(zip(("name", "count", "imported_at"), r, strict=True))
                for r in self.db.execute("SELECT name, count, imported_at FROM hash_lists ORDER BY id")
            ],
            "schema_version": SCHEMA_VERSION,
        }


def _statements(script: str) -> list[str]:
    """Split a migration script into complete SQL statements (triggers keep their inner semicolons)."""
    out, buf = [], ""
    for part in script.split(";"):
        buf += part + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n\t;"):
                out.append(buf.strip())
            buf = ""
    if buf.strip(" \n\t;"):
        raise ValueError(f"incomplete SQL statement in a migration: {buf.strip()[:80]}")
    return out


def _below(path: str, roots: Sequence[str] | None) -> bool:
    """Is `path` one of `roots` or inside one (a directory, or a tar shard's members)? None covers everything."""
    if roots is None:
        return True
    return any(path == r or path.startswith(r.rstrip("/") + "/") or path.startswith(r + "::") for r in roots)


def image_row_to_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A SQLite images row (no embedding) -> the shape answers use."""
    return {
        "id": row["id"],
        "sha256": row["sha256"],
        "size": row["size"],
        "width": row["width"],
        "height": row["height"],
        "format": row["format"],
        "probabilities": {lv: row[f"p_{lv}"] for lv in LEVELS},
        "scores": {lv: row[f"s_{lv}"] for lv in LEVELS},
        "level": row["level"],
        "pdq": {"hash": row["pdq"], "quality": row["pdq_quality"]},
        "run_id": row["run_id"],
        "indexed_at": row["indexed_at"],
    }
