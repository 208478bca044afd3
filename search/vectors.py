"""FAISS indexes derived from SQLite: built, caught up, checked (sha256 in the manifest) and written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from search.errors import IndexMismatch, IndexWriteFailed, InvalidArgument
from search.settings import Settings
from search.store import Store

log = logging.getLogger(__name__)

METRIC = "inner_product"
INDEX_NAMES = ("all", "unsafe")


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_index(factory: str, dim: int) -> faiss.Index:
    """An index over `dim`-d unit vectors, inner product, with SQLite ids (IDMap2 unless the factory takes ids)."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InvalidArgument(f"FAISS cannot build index factory {factory!r}: {str(e).splitlines()[-1]}") from None
    return faiss.IndexIDMap2(base)


def set_search_params(index: faiss.Index, settings: Settings) -> None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if settings.nprobe is not None and hasattr(inner, "nprobe"):
        inner.nprobe = settings.nprobe
    elif hasattr(inner, "nprobe") and inner.nprobe == 1:
        inner.nprobe = 16  # the faiss default of 1 gives poor recall
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = settings.ef_search or max(64, inner.hnsw.efSearch)


def index_ids(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64) if index.ntotal else np.zeros(0, np.int64)  # type: ignore[attr-defined,arg-type,call-arg,unused-ignore]  # faiss's SWIG stubs


@dataclass
class Snapshot:
    """One loaded FAISS index and the manifest describing it."""

    name: str
    index: faiss.Index
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def generation(self) -> int:
        return int(self.manifest.get("generation", 0))


class IndexFiles:
    """The derived FAISS files of a store: `<name>.<generation>.faiss` + `<name>.manifest.json`."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.dir = store.root / "faiss"
        #: damage found when loading, per index name (cleared by a good load or a save)
        self.problems: dict[str, str] = {}

    def manifest_path(self, name: str) -> Path:
        return self.dir / f"{name}.manifest.json"

    def read_manifest(self, name: str) -> dict[str, Any] | None:
        try:
            m = json.loads(self.manifest_path(name).read_text())
            return m if isinstance(m, dict) else None
        except (OSError, ValueError):
            return None

    def expected(self, name: str) -> dict[str, Any]:
        """What a manifest must say to be served for this store (beyond generation, watermark and count)."""
        ident = self.store.model_identity()
        exp: dict[str, Any] = {
            "name": name,
            "model_weights_sha256": ident.weights_sha256 if ident else None,
            "dim": ident.embedding_dim if ident else None,
            "metric": METRIC,
            "factory": self.factory_for(name),
            "deletion_epoch": self.store.deletion_epoch(),
        }
        return exp

    def factory_for(self, name: str) -> str:
        if name == "all":
            return str(self.store.get_info("index_factory", "Flat"))
        return "Flat"  # the known-unsafe subset is small and changes often: exact, and removals are cheap

    def check_file(self, name: str, m: dict[str, Any]) -> tuple[faiss.Index | None, str | None]:
        """Load the file a manifest names, checking its sha256 first: (index, None), or (None, what is wrong)."""
        path = self.dir / str(m.get("file", ""))
        want = m.get("sha256")
        if not want:
            return None, f"index {name}: the manifest names no sha256 of {path.name} (older version): cannot trust it"
        try:
            before = path.stat()
            got = file_sha256(path)
            index = faiss.read_index(str(path))
            after = path.stat()
        except (RuntimeError, OSError) as e:
            return None, f"index {name}: {path.name} is unreadable ({str(e).splitlines()[0] if str(e) else e!r})"
        if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
            return None, f"index {name}: {path.name} changed while it was being read"
        if got != want:
            return None, (
                f"index {name}: {path.name} is damaged: sha256 {got[:16]}... != manifest {str(want)[:16]}... "
                f"({before.st_size} bytes, manifest says {m.get('size')})"
            )
        if index.ntotal != m.get("count") or index.d != m.get("dim") or not isinstance(index, faiss.IndexIDMap2):
            return None, f"index {name}: {path.name} disagrees with its manifest (count, dim or id map)"
        return index, None

    def load(self, name: str) -> Snapshot | None:
        """The snapshot on disk, if its manifest and file agree with each other and with the store; else None.
        A file that fails its checksum is recorded in `problems` (and never returned)."""
        m = self.read_manifest(name)
        if m is None:
            return None
        exp = self.expected(name)
        diffs = {k: (m.get(k), v) for k, v in exp.items() if m.get(k) != v}
        if diffs:
            log.info("index %s is stale (%s): rebuilding", name, diffs)
            return None
        index, problem = self.check_file(name, m)
        if index is None:
            log.error("%s: rebuilding it from SQLite", problem)
            self.problems[name] = str(problem)
            return None
        self.problems.pop(name, None)
        return Snapshot(name, index, m)

    def disk_generation(self, name: str) -> int:
        return int((self.read_manifest(name) or {}).get("generation", 0) or 0)

    def save(self, snap: Snapshot) -> None:
        """Write the index under a new generation, then its manifest (the commit point), then drop old files.
        A failed write (IndexWriteFailed) leaves the previous generation in place and no file at the new name."""
        gen = max(snap.generation, self.disk_generation(snap.name)) + 1
        fname = f"{snap.name}.{gen:06d}.faiss"
        data = faiss.serialize_index(snap.index).tobytes()
        manifest = {
            **self.expected(snap.name),
            **{k: v for k, v in snap.manifest.items() if k in ("watermark", "members_hash")},
            "generation": gen,
            "file": fname,
            "count": int(snap.index.ntotal),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.dir / fname, data)
            atomic_write_bytes(self.manifest_path(snap.name), json.dumps(manifest, indent=1).encode())
        except OSError as e:
            with contextlib.suppress(OSError):
                if (self.read_manifest(snap.name) or {}).get("file") != fname:
                    (self.dir / fname).unlink()
            raise IndexWriteFailed(
                f"cannot write the FAISS index {fname} in {self.dir} ({e.strerror or e}); the previous index is "
                "kept and SQLite holds everything: free some space, then run `nsfw-index rebuild`"
            ) from e
        snap.manifest = manifest
        self.problems.pop(snap.name, None)
        for old in [*self.dir.glob(f"{snap.name}.*.faiss"), *self.dir.glob(f".{snap.name}.*.tmp")]:
            if old.name != fname:  # older generations, and temp files of killed writers (we hold the lock)
                with contextlib.suppress(OSError):
                    old.unlink()

    def verify(self) -> list[str]:
        """Problems with the FAISS files on disk (empty when fine): unreadable manifests, files that are missing,
        unreadable or fail their sha256, or disagree with their manifest. A missing or stale index is no problem
        (it is rebuilt from SQLite on open)."""
        out: list[str] = []
        for name in INDEX_NAMES:
            path = self.manifest_path(name)
            if not path.exists():
                continue
            m = self.read_manifest(name)
            if m is None:
                out.append(f"index {name}: {path.name} is not a readable manifest")
                continue
            _, problem = self.check_file(name, m)
            if problem:
                out.append(problem)
        return out

    # -- the index over all images --
    def build_all(self) -> Snapshot:
        factory = self.factory_for("all")
        dim = self.store.embedding_dim()
        index = make_index(factory, dim)
        watermark = self.store.max_image_id()
        inner = faiss.downcast_index(index.index)  # type: ignore[attr-defined,arg-type,call-arg,unused-ignore]  # faiss's SWIG stubs
        if not inner.is_trained:
            train = self._training_sample(watermark)
            if len(train) == 0:
                raise InvalidArgument(f"index factory {factory!r} needs training vectors but the store is empty")
            try:
                index.train(train)
            except RuntimeError as e:
                raise InvalidArgument(
                    f"training {factory!r} on {len(train)} vectors failed: {str(e).splitlines()[-1]}; "
                    "use a smaller factory (fewer IVF lists) or Flat"
                ) from None
        for ids, vecs in self.store.iter_vectors(0, watermark):
            index.add_with_ids(vecs, ids)
        return Snapshot("all", index, {"watermark": watermark})

    def _training_sample(self, upto: int, max_n: int = 200_000) -> np.ndarray:
        chunks = [v for _, v in self.store.iter_vectors(0, upto)]
        if not chunks:
            return np.zeros((0, self.store.embedding_dim()), np.float32)
        x = np.concatenate(chunks)
        if len(x) > max_n:
            x = x[np.random.default_rng(0).choice(len(x), max_n, replace=False)]
        return x

    def catch_up_all(self, snap: Snapshot) -> int:
        """Add rows committed after the snapshot's watermark. Returns how many were added."""
        wm = int(snap.manifest.get("watermark", 0))
        if self.store.count_images(wm) != snap.index.ntotal:
            raise IndexMismatch(
                f"index 'all' holds {snap.index.ntotal} vectors but the store has "
                f"{self.store.count_images(wm)} up to id {wm}"
            )
        added = 0
        top = self.store.max_image_id()
        for ids, vecs in self.store.iter_vectors(wm, top):
            snap.index.add_with_ids(vecs, ids)
            added += len(ids)
        snap.manifest["watermark"] = max(wm, top)
        return added

    # -- the index over the known-unsafe subset --
    def sync_unsafe(self, snap: Snapshot | None, unsafe_ids: set[int]) -> tuple[Snapshot, int, int]:
        """Make the unsafe index hold exactly `unsafe_ids`: add and remove the difference. Returns (snap, +n, -n)."""
        if snap is None:  # built anew: it stands in for the generation on disk (a reader does not reload it)
            gen = self.disk_generation("unsafe")
            snap = Snapshot(
                "unsafe", make_index("Flat", self.store.embedding_dim()), {"watermark": 0, "generation": gen}
            )
        have = set(index_ids(snap.index).tolist())
        add = sorted(unsafe_ids - have)
        remove = sorted(have - unsafe_ids)
        if remove:
            snap.index.remove_ids(np.asarray(remove, dtype=np.int64))  # type: ignore[attr-defined,arg-type,call-arg,unused-ignore]  # faiss's SWIG stubs
        if add:
            snap.index.add_with_ids(self.store.vectors(add), np.asarray(add, dtype=np.int64))
        snap.manifest["watermark"] = self.store.max_image_id()
        return snap, len(add), len(remove)

    def open_all(self, *, persist: bool) -> Snapshot:
        """The index over all images, caught up with SQLite (rebuilt when stale or damaged). `persist`: write it."""
        snap = self.load("all")
        changed = False
        if snap is not None:
            try:
                changed = self.catch_up_all(snap) > 0
            except IndexMismatch as e:
                log.warning("%s: rebuilding", e)
                snap = None
        if snap is None:
            snap = self.build_all()
            snap.manifest["generation"] = self.disk_generation("all")  # stands in for the file on disk
            changed = True
        set_search_params(snap.index, self.settings)
        if persist and changed:
            self.save(snap)
        return snap

    def open_unsafe(self, *, persist: bool) -> Snapshot:
        snap = self.load("unsafe")
        rebuilt = snap is None
        snap, added, removed = self.sync_unsafe(snap, set(self.store.known_unsafe(self.settings)))
        if persist and (added or removed or rebuilt):
            self.save(snap)
        return snap

    def rebuild(self) -> dict[str, int]:
        """Rebuild both files from SQLite (the caller holds the writer lock)."""
        all_snap = self.build_all()
        self.save(all_snap)
        unsafe, _, _ = self.sync_unsafe(None, set(self.store.known_unsafe(self.settings)))
        self.save(unsafe)
        return {"all": int(all_snap.index.ntotal), "unsafe": int(unsafe.index.ntotal)}

    def freshness(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        top = self.store.max_image_id()
        for name in INDEX_NAMES:
            m = self.read_manifest(name)
            if m is None:
                out[name] = {"exists": False}
                continue
            exp = self.expected(name)
            stale = [k for k, v in exp.items() if m.get(k) != v]
            damaged = None if stale else self.check_file(name, m)[1]  # a stale file is rebuilt anyway
            if damaged:
                stale.append("damaged")
            out[name] = {
                "exists": True,
                "generation": m.get("generation"),
                "count": m.get("count"),
                "factory": m.get("factory"),
                "watermark": m.get("watermark"),
                "behind_by": (self.store.count_images() - self.store.count_images(int(m.get("watermark", 0))))
                if name == "all"
                else None,
                "fresh": not stale and (name != "all" or int(m.get("watermark", 0)) >= top),
                "stale_because": stale,
                "checksum": "missing" if not m.get("sha256") else ("mismatch" if damaged else "ok"),
                "damaged": damaged,
            }
        return out
