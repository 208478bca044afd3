"""Store-level operations without torch: the FAISS factory of a store, and rebuilding the derived FAISS files."""

from __future__ import annotations

import contextlib
from typing import Any

from search import ondisk
from search.settings import Settings
from search.store import Store
from search.vectors import ON_DISK_KEY, IndexFiles, make_index


def check_factory(factory: str, dim: int, *, on_disk: bool) -> None:
    """InvalidArgument unless FAISS can build `factory` (and, on disk, it is an IVF whose lists can live in a file)."""
    index = make_index(factory, dim, wrap=not on_disk)
    if on_disk:
        ondisk.require_on_disk_capable(index, factory)


def set_index_factory(store: Store, factory: str | None, dim: int | None = None) -> bool:
    """Record a new FAISS factory for the index over all images; True when it changed (the index is then rebuilt)."""
    if factory is None or factory == store.get_info("index_factory", "Flat"):
        return False
    check_factory(factory, dim or 8, on_disk=bool(store.get_info(ON_DISK_KEY, False)))  # before recording it
    store.set_info("index_factory", factory)
    return True


def rebuild_indexes(
    store: Store, settings: Settings, *, index_factory: str | None = None, on_disk: bool | None = None
) -> dict[str, int]:
    """Rebuild both FAISS files from SQLite, with `index_factory` and `on_disk` (None: the store's current ones).
    They are recorded only once the new index is built and written: a factory that FAISS refuses, or that fails to
    train, changes nothing and the old files keep serving. The caller holds the writer lock
    (`Store.writing(dir, "nsfw-index rebuild")`); a handle without it takes it for the rebuild."""
    with contextlib.nullcontext() if store.holds_writer_lock else store.writer_lock("nsfw-index rebuild"):
        files = IndexFiles(store, settings)
        factory = index_factory or files.factory_for("all")
        placed = files.on_disk_for("all") if on_disk is None else on_disk
        check_factory(factory, store.embedding_dim(), on_disk=placed)
        snap = files.build_all(factory=factory, on_disk=placed, persist=True)
        before: dict[str, Any] = {"index_factory": files.factory_for("all"), ON_DISK_KEY: files.on_disk_for("all")}
        try:
            store.set_info("index_factory", factory)  # save() writes the manifest from the store's info
            store.set_info(ON_DISK_KEY, placed)
            files.save(snap)
        except BaseException:
            for key, value in before.items():
                store.set_info(key, value)
            if snap.pending is not None:
                snap.pending.unlink(missing_ok=True)
            raise
        return {"all": int(snap.index.ntotal), "unsafe": files.rebuild_unsafe()}
