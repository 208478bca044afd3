"""Entry points the CLI and the HTTP layer share for writing: index inputs, add one image."""

from __future__ import annotations

from pathlib import Path

from indexer.analyze import Analysis
from indexer.extractor import Extractor
from indexer.pipeline import Indexer, RunSummary
from search.labels import stored_match_distance
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


def index_inputs(
    store_dir: Path,
    inputs: list[str],
    settings: Settings,
    *,
    prune: bool = False,
    rebuild: bool = False,
    all_files: bool = False,
    index_factory: str | None = None,
    progress: bool = False,
    extractor: Extractor | None = None,
) -> RunSummary:
    """Take the writer lock (or fail at once with StoreLocked), load the model, index, update the FAISS files."""
    store = Store(store_dir, create=True)
    try:
        with store.writer_lock("nsfw-index index"):
            ex = extractor or Extractor.from_settings(settings)
            if not rebuild:
                store.check_model(ex.identity.as_dict())  # refuse before any work
            set_index_factory(store, index_factory, ex.identity.embedding_dim)
            return Indexer(store, ex, settings, progress=progress, all_files=all_files).run(
                inputs,
                prune=prune,
                rebuild=rebuild,
                args={"inputs": inputs, "prune": prune, "rebuild": rebuild, "model": settings.model},
            )
    finally:
        store.close()


def add_image(
    store_dir: Path,
    ex: Extractor,
    settings: Settings,
    analysis: Analysis,
    *,
    lock_timeout: float = 5.0,
    run_kind: str = "http-add",
) -> tuple[int, bool]:
    """Add one analysed image (an upload) to the store, under the writer lock. Returns (id, created).

    The upload's path is recorded as `upload://SHA256` (no client path is stored or shown). Committed to SQLite
    before returning, so an acknowledged add survives a crash; the FAISS files catch up on the next open.
    """
    store = Store(store_dir, create=True)
    try:
        with store.writer_lock("nsfw-index add").acquire(timeout=lock_timeout):
            store.check_model(ex.identity.as_dict())
            existing = store.ids_by_sha([analysis.sha256])
            if existing:
                return existing[analysis.sha256], False
            run_id = store.begin_run(run_kind, {"sha256": analysis.sha256})
            ids = store.write_batch(
                run_id,
                [analysis.record()],
                [(f"upload://{analysis.sha256}", analysis.sha256, analysis.size, None)],
                match_distance=stored_match_distance(settings),
            )
            store.finish_run(run_id, "done", {"new_images": 1}, {})
            return ids[analysis.sha256], True
    finally:
        store.close()
