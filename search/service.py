"""Store-level operations without torch: the FAISS factory of a store, and rebuilding the derived FAISS files."""

from __future__ import annotations

import contextlib

from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, make_index


def set_index_factory(store: Store, factory: str | None, dim: int | None = None) -> bool:
    """Record a new FAISS factory for the index over all images; True when it changed (the index is then rebuilt)."""
    if factory is None or factory == store.get_info("index_factory", "Flat"):
        return False
    make_index(factory, dim or 8)  # validate the string before recording it
    store.set_info("index_factory", factory)
    return True


def rebuild_indexes(store: Store, settings: Settings, *, index_factory: str | None = None) -> dict[str, int]:
    """Rebuild both FAISS files from SQLite, first recording `index_factory` if given (validated). The caller holds
    the writer lock (`Store.writing(dir, "nsfw-index rebuild")`); a handle without it takes it for the rebuild."""
    with contextlib.nullcontext() if store.holds_writer_lock else store.writer_lock("nsfw-index rebuild"):
        if index_factory is not None:
            make_index(index_factory, store.embedding_dim())  # validate before recording
            store.set_info("index_factory", index_factory)
        return IndexFiles(store, settings).rebuild()
