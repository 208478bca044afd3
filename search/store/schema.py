"""The store's schema: numbered migrations (SQL scripts) applied in order on open; PRAGMA user_version records the
last one applied."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from search.errors import StoreCorrupt

# Numbered migrations, applied in order on open; PRAGMA user_version holds the last applied number. Append only:
# never edit a migration that has shipped, add the next number instead.
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


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, db_path: Path, *, readonly: bool) -> bool:
    """Bring the database up to SCHEMA_VERSION. Returns True when migrations ran.

    A read-only opener migrates through a short-lived writable connection and keeps reading read-only."""
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreCorrupt(
            f"{db_path} has schema version {version}, newer than this nsfw-index ({SCHEMA_VERSION}); upgrade"
        )
    if version == SCHEMA_VERSION:
        return False
    writer = conn
    if readonly:
        try:
            writer = sqlite3.connect(db_path, timeout=30)
        except sqlite3.Error as e:
            raise StoreCorrupt(
                f"{db_path} needs schema migrations {version + 1}..{SCHEMA_VERSION} and "
                f"cannot be opened for writing ({e}); run any writing verb once"
            ) from e
    try:
        apply_migrations(writer, version)
    finally:
        if writer is not conn:
            writer.close()
    return True


def apply_migrations(conn: sqlite3.Connection, version: int) -> None:
    """Each migration and its version bump commit together; concurrent openers serialise on BEGIN IMMEDIATE and
    skip what another process applied meanwhile."""
    for number in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) < number:
                for statement in statements(MIGRATIONS[number - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def statements(script: str) -> list[str]:
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
