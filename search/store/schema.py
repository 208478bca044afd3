"""The store's schema: numbered migrations (`migrations/NNNN_name.sql`) applied in order on open; PRAGMA
user_version records the last one applied."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from search.errors import StoreCorrupt
from search.store.chain import seal_label_log

#: Numbered migrations, one SQL script a file (`migrations/NNNN_name.sql`), applied in order on open; PRAGMA
#: user_version holds the last applied number. Append only: never edit a migration that has shipped, add the next
#: number instead.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[str]:
    """The migration scripts in order; their numbers must run 1, 2, 3... without a gap or a repeat."""
    files = sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    numbers = [int(f.name[:4]) for f in files]
    if numbers != list(range(1, len(files) + 1)):
        raise StoreCorrupt(f"the store migrations in {directory} are not numbered 1..{len(files)}: {numbers}")
    return [f.read_text(encoding="utf-8") for f in files]


MIGRATIONS: list[str] = load_migrations()
SCHEMA_VERSION = len(MIGRATIONS)
#: Python steps run right after a migration's SQL, in the same transaction (migration number -> step).
FOLLOW_UPS: dict[int, Callable[[sqlite3.Connection], None]] = {3: seal_label_log}


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
                if number in FOLLOW_UPS:
                    FOLLOW_UPS[number](conn)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def statements(script: str) -> list[str]:
    """Split a migration script into complete SQL statements (triggers keep their inner semicolons)."""
    out, buf = [], ""
    script = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    for part in script.split(";"):
        buf += part + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n\t;"):
                out.append(buf.strip())
            buf = ""
    if buf.strip(" \n\t;"):
        raise ValueError(f"incomplete SQL statement in a migration: {buf.strip()[:80]}")
    return out
