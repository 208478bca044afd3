"""Entry points the CLI and the HTTP layer share for writing (into a store from `Store.writing`): index, add one."""

from __future__ import annotations

from collections.abc import Sequence

from indexer.analyze import Analysis
from indexer.extractor import Extractor
from indexer.pipeline import Indexer, RunSummary
from search.errors import InvalidArgument
from search.labels import stored_match_distance
from search.service import set_index_factory
from search.settings import Settings
from search.store import Store


def _require_writer(store: Store, what: str) -> None:
    if store.readonly or not store.holds_writer_lock:
        raise InvalidArgument(
            f"{what} needs the store opened for writing with its writer lock: "
            f"use Store.writing({str(store.root)!r}, ...)"
        )


def index_inputs(
    store: Store,
    inputs: Sequence[str],
    settings: Settings,
    *,
    prune: bool = False,
    rebuild: bool = False,
    all_files: bool = False,
    index_factory: str | None = None,
    progress: bool = False,
    extractor: Extractor | None = None,
) -> RunSummary:
    """Load the model (unless given), refuse a store of another model before any work, index, update the FAISS files."""
    _require_writer(store, "indexing")
    ex = extractor or Extractor.from_settings(settings)
    if not rebuild:
        store.check_model(ex.identity)  # refuse before any work
    set_index_factory(store, index_factory, ex.identity.embedding_dim)
    return Indexer(store, ex, settings, progress=progress, all_files=all_files).run(
        list(inputs),
        prune=prune,
        rebuild=rebuild,
        args={"inputs": list(inputs), "prune": prune, "rebuild": rebuild, "model": settings.model},
    )


def add_image(
    store: Store, ex: Extractor, settings: Settings, analysis: Analysis, *, run_kind: str = "http-add"
) -> tuple[int, bool]:
    """Add one analysed image (an upload) to the store. Returns (id, created).

    The upload's path is recorded as `upload://SHA256` (no client path is stored or shown). Committed to SQLite
    before returning, so an acknowledged add survives a crash; the FAISS files catch up on the next open.
    """
    _require_writer(store, "adding an image")
    store.check_model(ex.identity)
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
