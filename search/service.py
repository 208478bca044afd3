"""Store-level operations without torch: rebuilding the derived FAISS files."""

from __future__ import annotations

from pathlib import Path

from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, make_index


def rebuild_indexes(store_dir: Path, settings: Settings, *, index_factory: str | None = None) -> dict[str, int]:
    with Store(store_dir) as store, store.writer_lock("nsfw-index rebuild"):
        if index_factory is not None:
            make_index(index_factory, store.embedding_dim())  # validate before recording
            store.set_info("index_factory", index_factory)
        return IndexFiles(store, settings).rebuild()
