"""The store directory: `meta.sqlite` (WAL, numbered migrations) as the source of truth, and the writer lock.

Modules: `schema` (migrations), `lock` (WriterLock), `sql` (IN-list chunks), `rows` (records and typed rows), `base`
(connection, info, model identity), `images`, `hashlists`, `labels`, `runs` and `clusters` (each table family's SQL,
mixins of `Store`), `core` (`Store` itself)."""

from __future__ import annotations

from search.policy import LABELS, SOURCES
from search.store.base import DB_FILE
from search.store.core import Store
from search.store.lock import LOCK_FILE, WriterLock
from search.store.rows import IMAGE_COLUMNS, ImageRecord, Thumbnail, image_row, utcnow, vectors_from_blobs
from search.store.schema import MIGRATIONS, SCHEMA_VERSION
from search.store.sql import chunks

__all__ = [
    "DB_FILE",
    "IMAGE_COLUMNS",
    "LABELS",
    "LOCK_FILE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SOURCES",
    "ImageRecord",
    "Store",
    "Thumbnail",
    "WriterLock",
    "chunks",
    "image_row",
    "utcnow",
    "vectors_from_blobs",
]
