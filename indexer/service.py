"""Entry points the CLI and the HTTP layer share for writing: index inputs, add one image."""

from __future__ import annotations

from pathlib import Path

from indexer.extractor import Extractor
from indexer.pipeline import Indexer, RunSummary
from search.settings import Settings
from search.store import Store
from search.vectors import make_index


def set_index_factory(store: Store, factory: str | None, dim: int | None = None) -> bool:
    """Record a new FAISS factory for the index over all images; True when it changed (the index is then rebuilt)."""
    if factory is None or factory == store.get_info("index_factory", "Flat"):
        return False
    make_index(factory, dim or 8)  # validate the string before recording it
    store.set_info("index_factory", factory)
    return True


def index_inputs(store_dir: Path, inputs: list[str], settings: Settings, *, prune: bool = False,
                 rebuild: bool = False, all_files: bool = False, index_factory: str | None = None,
                 progress: bool = False, extractor: Extractor | None = None) -> RunSummary:
    """Take the writer lock (or fail at once with StoreLocked), load the model, index, update the FAISS files."""
    store = Store(store_dir, create=True)
    try:
        with store.writer_lock("nsfw-index index"):
            ex = extractor or Extractor.from_settings(settings)
            if not rebuild:
                store.check_model(ex.identity.as_dict())  # refuse before any work
            set_index_factory(store, index_factory, ex.identity.embedding_dim)
            return Indexer(store, ex, settings, progress=progress, all_files=all_files).run(
                inputs, prune=prune, rebuild=rebuild,
                args={"inputs": inputs, "prune": prune, "rebuild": rebuild, "model": settings.model},
            )
    finally:
        store.close()
