"""Entry points the CLI and the HTTP layer share for writing (into a store from `Store.writing`): index, add one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from indexer.analyze import Analysis
from indexer.extractor import Extractor
from indexer.pipeline import Indexer, Progress, RunSummary
from indexer.thumbnails import choose_thumbnails, thumbnail_of_bytes
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


def start_index_run(
    store: Store,
    settings: Settings,
    *,
    rebuild: bool,
    thumbnails: bool,
    index_factory: str | None,
    progress: bool | Progress,
    extractor: Extractor | None,
    load: Callable[[Settings], Extractor] = Extractor.from_settings,
) -> tuple[Extractor, Progress]:
    """What every index run (local or on Ray) does before any work: the writer lock, the model (`extractor`, else
    `load(settings)`), the store's model check (unless rebuilding), the thumbnail choice and the index factory."""
    _require_writer(store, "indexing")
    bar = progress if isinstance(progress, Progress) else Progress(progress)
    if extractor is None:
        bar.stage(f"loading model {settings.model} ...")
    ex = extractor or load(settings)
    if not rebuild:
        store.check_model(ex.identity)  # refuse before any work
    choose_thumbnails(store, thumbnails, rebuild=rebuild)
    set_index_factory(store, index_factory, ex.identity.embedding_dim)
    return ex, bar


def index_inputs(
    store: Store,
    inputs: Sequence[str],
    settings: Settings,
    *,
    prune: bool = False,
    rebuild: bool = False,
    all_files: bool = False,
    index_factory: str | None = None,
    progress: bool | Progress = False,
    extractor: Extractor | None = None,
    thumbnails: bool = False,
    retry_errors: bool = False,
) -> RunSummary:
    """Load the model (unless given), refuse a store of another model before any work, index, update the FAISS files.

    `thumbnails` makes a new store keep thumbnails (`indexer.thumbnails.choose_thumbnails`); later runs follow it.
    `progress`: a terminal progress bar (True, or a `Progress` writing elsewhere); `retry_errors`: try files that
    failed before even when unchanged (by default they are skipped and counted as `unchanged_errors`)."""
    ex, bar = start_index_run(
        store,
        settings,
        rebuild=rebuild,
        thumbnails=thumbnails,
        index_factory=index_factory,
        progress=progress,
        extractor=extractor,
    )
    return Indexer(store, ex, settings, progress=bar, all_files=all_files, retry_errors=retry_errors).run(
        list(inputs),
        prune=prune,
        rebuild=rebuild,
        args={"inputs": list(inputs), "prune": prune, "rebuild": rebuild, "model": settings.model},
    )


def add_image(
    store: Store,
    ex: Extractor,
    settings: Settings,
    analysis: Analysis,
    *,
    run_kind: str = "http-add",
    data: bytes | None = None,
) -> tuple[int, bool]:
    """Add one analysed image (an upload) to the store. Returns (id, created).

    In a store that keeps thumbnails, the upload's `data` gives its thumbnails (written with the image).

    The upload's path is recorded as `upload://SHA256` (no client path is stored or shown). Committed to SQLite
    before returning, so an acknowledged add survives a crash; the FAISS files catch up on the next open.
    """
    _require_writer(store, "adding an image")
    store.check_model(ex.identity)
    existing = store.ids_by_sha([analysis.sha256])
    if existing:
        return existing[analysis.sha256], False
    record = analysis.record()
    if record.thumbnail is None and data is not None and store.thumbnails_enabled():
        record.thumbnail = thumbnail_of_bytes(analysis.name, data, settings)
    run_id = store.begin_run(run_kind, {"sha256": analysis.sha256}, engine=ex.describe())
    ids = store.write_batch(
        run_id,
        [record],
        [(f"upload://{analysis.sha256}", analysis.sha256, analysis.size, None)],
        match_distance=stored_match_distance(settings),
    )
    store.finish_run(run_id, "done", {"new_images": 1}, {})
    return ids[analysis.sha256], True
