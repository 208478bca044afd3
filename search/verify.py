"""`verify`: a store's integrity — SQLite, the label chain, the FAISS files' checksums (an on-disk index's .ivfdata
read whole), FAISS ids against SQLite."""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from search.answers import VerifyCheck, VerifyReport
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, index_ids

SHOWN = 10  # ids named per problem


def _ids(xs: list[int]) -> str:
    more = f" and {len(xs) - SHOWN} more" if len(xs) > SHOWN else ""
    return ", ".join(map(str, xs[:SHOWN])) + more


def _check(name: str, run: Callable[[], tuple[list[str], list[str]]]) -> VerifyCheck:
    problems, notes = run()
    return VerifyCheck(name=name, ok=not problems, problems=problems, notes=notes)


def sqlite_integrity(store: Store) -> tuple[list[str], list[str]]:
    return [f"PRAGMA integrity_check: {m}" for m in store.integrity_check()], []


def label_chain(store: Store) -> tuple[list[str], list[str]]:
    return list(store.verify_label_chain()), []


def index_checksums(files: IndexFiles) -> tuple[list[str], list[str]]:
    notes = [
        f"index {n}: no file yet (built from SQLite on open)" for n in ("all", "unsafe") if not files.read_manifest(n)
    ]
    leftovers = sorted(p.name for p in files.dir.glob(".*.tmp")) if files.dir.exists() else []
    if leftovers:
        notes.append(f"temp files of an interrupted write (removed by the next write): {', '.join(leftovers)}")
    return files.verify(), notes


def index_ids_match(store: Store, files: IndexFiles, settings: Settings) -> tuple[list[str], list[str]]:
    """FAISS ids are SQLite ids: `all` holds exactly the images up to its watermark (Flat: with the same vectors);
    `unsafe` holds only stored images. Behind (newer rows, label changes) is a note: open catches it up."""
    problems: list[str] = []
    notes: list[str] = []
    for name in ("all", "unsafe"):
        if files.read_manifest(name) is None:
            continue
        snap = files.load(name)
        if snap is None:
            if name in files.problems:
                continue  # damage: reported by the checksum check
            notes.append(f"index {name}: stale (model, factory or deletions changed): rebuilt from SQLite on open")
            continue
        if snap.on_disk:
            m = snap.manifest
            notes.append(f"index {name}: inverted lists on disk in {m.get('ivfdata')} ({m.get('ivfdata_size')} bytes)")
        got = index_ids(snap.index)
        uniq = np.unique(got)
        if len(uniq) != len(got):
            problems.append(f"index {name}: {len(got) - len(uniq)} ids appear more than once")
        wm = int(snap.manifest.get("watermark", 0))
        if name == "all":
            want = np.asarray(store.image_ids(wm), dtype=np.int64)
            missing = np.setdiff1d(want, uniq).tolist()
            extra = np.setdiff1d(uniq, want).tolist()
            if missing:
                problems.append(f"index all: lacks {len(missing)} SQLite image(s) up to id {wm}: {_ids(missing)}")
            if extra:
                problems.append(f"index all: holds {len(extra)} id(s) SQLite does not have: {_ids(extra)}")
            if not missing and not extra and len(uniq) == len(got):
                problems += _flat_vectors_match(store, snap.index, want, snap.manifest.get("factory"))
            behind = store.count_images() - store.count_images(wm)
            if behind:
                notes.append(f"index all: {behind} image(s) added after its snapshot (caught up on open)")
        else:
            stored = set(store.image_ids())
            extra = sorted(set(uniq.tolist()) - stored)
            if extra:
                problems.append(f"index unsafe: holds {len(extra)} id(s) SQLite does not have: {_ids(extra)}")
            current = set(store.known_unsafe(settings))
            diff = len((current ^ set(uniq.tolist())) - set(extra))
            if diff:
                notes.append(f"index unsafe: {diff} known-unsafe change(s) since its snapshot (caught up on open)")
    return problems, notes


def _flat_vectors_match(store: Store, index: faiss.Index, ids: np.ndarray, factory: object) -> list[str]:
    """An exact (Flat) index stores the vectors themselves: they must equal SQLite's embeddings."""
    if factory != "Flat" or len(ids) == 0:
        return []
    inner = faiss.downcast_index(index.index)  # type: ignore[attr-defined,arg-type,call-arg,unused-ignore]  # SWIG stubs
    stored = inner.reconstruct_n(0, index.ntotal)
    order = np.argsort(index_ids(index), kind="stable")
    truth = np.concatenate([v for _, v in store.iter_vectors(0, int(ids[-1]))])
    bad = np.flatnonzero(~np.all(np.isclose(stored[order], truth, atol=1e-6), axis=1))
    if len(bad):
        return [f"index all: {len(bad)} vector(s) differ from SQLite's embeddings: ids {_ids(ids[bad].tolist())}"]
    return []


def verify_store(store: Store, settings: Settings) -> VerifyReport:
    """Every check of `nsfw-index verify` over an open store (read-only is enough); nothing is changed."""
    files = IndexFiles(store, settings)
    checks = [_check("sqlite integrity", lambda: sqlite_integrity(store))]
    checks.append(_check("label chain", lambda: label_chain(store)))
    if store.model_identity() is not None:
        checks.append(_check("index checksums", lambda: index_checksums(files)))
        checks.append(_check("index ids", lambda: index_ids_match(store, files, settings)))
    return VerifyReport(ok=all(c.ok for c in checks), checks=checks)
