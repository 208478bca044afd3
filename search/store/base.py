"""The connection side of `Store`: opening (WAL, migrations), transactions, the writer lock, store info and the
model identity. The table mixins (images, labels, hash lists, runs, clusters) build on it."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from search.errors import StoreCorrupt, StoreNotFound
from search.pdq import HashMatcher
from search.policy import ModelIdentity
from search.store.lock import WriterLock
from search.store.schema import SCHEMA_VERSION, migrate

DB_FILE = "meta.sqlite"


class StoreBase:
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
        self._locks: list[WriterLock] = []
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
                # deleted content (a dropped image's thumbnails) is overwritten with zeros, not left in free pages
                conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA foreign_keys = ON")
            # a REPLACE that deletes a row fires its delete triggers (the label log's guard among them)
            conn.execute("PRAGMA recursive_triggers = ON")
            self.db = sqlite_utils.Database(conn)
            if migrate(conn, self.db_path, readonly=readonly) and not readonly:
                self.set_info("schema_version", SCHEMA_VERSION)
        except sqlite3.DatabaseError as e:
            raise StoreCorrupt(f"{self.db_path} is not a readable nsfw-index store ({e})") from e

    def close(self) -> None:
        self.db.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed on success, rolled back on any exception."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    # -- the writer lock --
    def writer_lock(self, purpose: str) -> WriterLock:
        """This store's writer lock (not taken yet: `with store.writer_lock(...)` or `.acquire(timeout)`)."""
        lock = WriterLock(self.root, purpose)
        self._locks = [k for k in self._locks if k.held] + [lock]
        return lock

    @property
    def holds_writer_lock(self) -> bool:
        """Whether this handle holds the store's writer lock (taken through `writing()` or `writer_lock()`)."""
        return any(k.held for k in self._locks)

    # -- store info --
    def get_info(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM store_info WHERE key = ?", [key]).fetchone()
        return json.loads(row[0]) if row else default

    def set_info(self, key: str, value: Any) -> None:
        with self.db.conn:
            self.db.execute("INSERT OR REPLACE INTO store_info (key, value) VALUES (?, ?)", [key, json.dumps(value)])

    def deletion_epoch(self) -> int:
        """Bumped whenever images are dropped: derived indexes compare it and rebuild."""
        return int(self.get_info("deletion_epoch", 0))

    # -- the model the vectors come from --
    def model_identity(self) -> ModelIdentity | None:
        """The identity recorded by the first index run (None: no model yet, an empty store)."""
        info = self.get_info("model")
        return ModelIdentity.from_stored(info) if info else None

    def check_model(self, identity: ModelIdentity, *, adopt: bool = False) -> None:
        """Refuse vectors of another model (ModelMismatch naming each difference). An empty store adopts the
        identity; `adopt` replaces it (a rebuild re-embeds everything)."""
        current = self.get_info("model")
        if not current or adopt:
            self.set_info("model", identity.stored())
            return
        identity.require_same_as(current, f"the store at {self.root}")

    def embedding_dim(self) -> int:
        ident = self.model_identity()
        if ident is None:
            raise StoreNotFound(f"the store at {self.root} has no images yet; index some first")
        return ident.embedding_dim

    # -- checks --
    def integrity_check(self) -> list[str]:
        """`PRAGMA integrity_check`: empty when SQLite finds the database sound, else its messages."""
        rows = [str(r[0]) for r in self.db.execute("PRAGMA integrity_check").fetchall()]
        return [] if rows == ["ok"] else rows

    def image_ids(self, upto_id: int | None = None) -> list[int]:
        """Every image id (up to `upto_id`), in order."""
        q = "SELECT id FROM images" + (" WHERE id <= ?" if upto_id is not None else "") + " ORDER BY id"
        return [int(r[0]) for r in self.db.execute(q, [] if upto_id is None else [upto_id])]
