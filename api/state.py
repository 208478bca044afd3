"""What a running server holds: the model, the inference worker, the current Searcher and its readiness."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from api.schemas import IndexInfo, ModelInfo
from api.worker import InferenceWorker
from indexer.extractor import Extractor
from search.errors import IndexMismatch, ModelMismatch, NsfwIndexError
from search.policy import ModelIdentity
from search.query import Searcher
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles

log = logging.getLogger(__name__)


def mismatch_message(stored: ModelIdentity, loaded: ModelIdentity) -> str | None:
    """Why a store built with `stored` must not be searched with embeddings of `loaded` (None: same model)."""
    diffs = stored.differences(loaded)
    if not diffs:
        return None
    return (
        "the store was built with another model than the one this server loaded (store vs server: "
        f"{'; '.join(diffs)}): similarities across models mean nothing. Restart the server with the store's "
        "--model, or re-embed the store with `nsfw-index index ... --rebuild`"
    )


class Service:
    """The server's state. The Searcher is swapped whole when a new FAISS snapshot appears (built aside while the
    old one keeps serving); smaller changes (labels, rows added since the snapshot) are caught up in place.

    Readiness (`not_ready`, `mismatch`, `index_info`) is computed on refresh and only read by /readyz, so that the
    probe never waits on a lock that inference or search holds. A FAISS file that fails its checksum keeps the server
    ready (200): the Searcher serves an index rebuilt from SQLite in memory, never the damaged file, and /readyz
    lists the damage under `index.problems` (503 would take a replica that answers correctly out of rotation).
    """

    def __init__(self, settings: Settings, extractor: Extractor) -> None:
        if settings.store is None:
            raise ValueError("settings.store must name the store directory")
        self.settings = settings
        self.store_dir = Path(settings.store)
        self.extractor = extractor
        self.identity: ModelIdentity = extractor.identity
        engine = extractor.describe()
        self.model_info = ModelInfo(
            architecture=self.identity.architecture,
            weights_sha256=self.identity.weights_sha256,
            backend=engine["backend"],
            dtype=engine["dtype"],
        )
        self.worker = InferenceWorker(extractor, settings)
        self.searcher: Searcher | None = None
        self.not_ready: str | None = "starting"
        self.mismatch: str | None = None
        self.store_identity: ModelIdentity | None = None
        self.index_info: dict[str, Any] = {}
        self._swap = threading.Lock()  # serialises refreshes and swaps of `searcher`
        self._probe: Store | None = None
        self._seen: tuple[int, int] = (0, 0)  # _disk_state() when the current Searcher was built
        self._load_error: str | None = None

    # -- lifecycle --
    def open(self) -> None:
        """Create (or migrate) the store, open the Searcher, start the worker. Runs once, at startup."""
        Store(self.store_dir, create=True).close()  # applies migrations; readers open read-only
        self._probe = Store(self.store_dir, readonly=True)
        with self._swap:
            self._seen = self._disk_state()
            try:
                self.searcher = Searcher.open(self.store_dir, self.settings)
            except NsfwIndexError as e:  # e.g. a damaged index: serve what we can, /readyz says why
                log.error("cannot load the index: %s", e)
                self._load_error = f"index not loaded: {e}"
            self._update_status()
        self.worker.start()

    def close(self) -> None:
        self.worker.stop()
        with self._swap:
            if self.searcher is not None:
                self.searcher.close()
            if self._probe is not None:
                self._probe.close()

    # -- keeping up with the store --
    def _disk_state(self) -> tuple[int, int]:
        """(generation of the FAISS snapshot on disk, deletion epoch): when either moves, a new Searcher is built."""
        assert self._probe is not None
        manifest = IndexFiles(self._probe, self.settings).read_manifest("all") or {}
        return int(manifest.get("generation", 0) or 0), self._probe.deletion_epoch()

    def refresh(self) -> None:
        """Background refresh: swap in a new snapshot built aside, or catch the current one up in place."""
        if self._probe is None:
            return
        with self._swap:
            disk = self._disk_state()
            heavy = self.searcher is None or disk != self._seen
        if not heavy:
            self.refresh_now()
            return
        try:
            fresh = Searcher.open(self.store_dir, self.settings)  # the old Searcher keeps serving meanwhile
        except NsfwIndexError as e:
            log.warning("new index snapshot not loaded (still serving the previous one, if any): %s", e)
            with self._swap:
                self._load_error = f"index not loaded: {e}"
                self._update_status()
            return
        with self._swap:
            fresh.refresh()  # whatever was committed while it loaded (e.g. a label acknowledged since)
            # the old Searcher is not closed here: requests that took it may still be using it; its SQLite
            # connection closes when the last of them lets go of it
            self.searcher, self._seen, self._load_error = fresh, disk, None
            self._update_status()

    def refresh_now(self) -> None:
        """Catch the current Searcher up with SQLite now (after a write over HTTP, before answering)."""
        with self._swap:
            if self.searcher is not None:
                try:
                    self.searcher.refresh()
                except NsfwIndexError as e:
                    log.warning("refresh failed: %s", e)
            self._update_status()

    def _update_status(self) -> None:
        assert self._probe is not None
        ident = self._probe.model_identity()
        self.store_identity = ident
        searcher = self.searcher
        self.index_info = searcher.index_info() if searcher is not None else {}
        if ident is None:
            self.mismatch = None
            self.not_ready = "the store has no images yet: index some with `nsfw-index index` or POST /v1/images"
            return
        self.mismatch = mismatch_message(ident, self.identity)
        if self.mismatch:
            self.not_ready = self.mismatch
            return
        self.mismatch = None
        if searcher is None or not searcher.ready:
            self.not_ready = self._load_error or "index not loaded yet"
            return
        self.not_ready = None

    def index_summary(self) -> IndexInfo:
        info = self.index_info
        return IndexInfo(
            ready=self.not_ready is None,
            images=int(info.get("images", 0)),
            known_unsafe=int(info.get("known_unsafe", 0)),
            generation=info.get("generation"),
            loaded_at=info.get("loaded_at"),
            problems=list(info.get("problems", [])),
        )

    def store_model_info(self) -> ModelInfo:
        """The model of the store's vectors (answers computed from them alone name it), else the loaded one."""
        ident = self.store_identity
        if ident is None or ident == self.identity:  # the server's own model: say which backend and dtype ran it
            return self.model_info
        return ModelInfo(architecture=ident.architecture, weights_sha256=ident.weights_sha256)

    def query_searcher(self, *, require_model: bool = True) -> Searcher | None:
        """The Searcher a query should use now; None while the store has no images (answers: scores only).

        Raises ModelMismatch when the store belongs to another model than the loaded one (`require_model`: the
        answer compares a fresh embedding with stored ones): no answer is better than a wrong one.
        """
        if self.mismatch and require_model:
            raise ModelMismatch(self.mismatch)
        searcher = self.searcher
        if searcher is None or not searcher.ready:
            if self.store_identity is None:
                return None
            raise IndexMismatch(self.not_ready or "the index is not loaded yet; retry shortly")
        return searcher
