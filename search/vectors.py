"""FAISS indexes derived from SQLite: built, caught up, checked (sha256 in the manifest) and written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from search import ondisk
from search.durable import atomic_write_bytes, fsync_dir
from search.errors import IndexMismatch, IndexWriteFailed, InvalidArgument
from search.settings import Settings
from search.snapshot import Snapshot as Snapshot  # re-exported: the loaded index
from search.snapshot import faiss_reason, refine_factor
from search.snapshot import index_ids as index_ids
from search.snapshot import make_index as make_index
from search.snapshot import search_one as search_one
from search.snapshot import set_search_params as set_search_params
from search.store import Store

log = logging.getLogger(__name__)

METRIC = "inner_product"
INDEX_NAMES = ("all", "unsafe")
ON_DISK_KEY = "index_on_disk"  # store info: the index over all images keeps its inverted lists on disk
LEFTOVERS = (".faiss", ".ivfdata", ".tmp")  # older generations, and temp files of killed writers


class IndexFiles:
    """The derived FAISS files of a store: `<name>.<generation>.faiss` + `<name>.manifest.json`, and for an on-disk
    index `<name>.<generation>.ivfdata` (its inverted lists)."""

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
        return {
            "name": name,
            "model_weights_sha256": ident.weights_sha256 if ident else None,
            "dim": ident.embedding_dim if ident else None,
            "metric": METRIC,
            "factory": self.factory_for(name),
            "on_disk": self.on_disk_for(name),
            "deletion_epoch": self.store.deletion_epoch(),
        }

    def stale_keys(self, name: str, m: dict[str, Any]) -> list[str]:
        """What makes a manifest unservable for this store now (a manifest older than `on_disk` is in memory)."""
        return [k for k, v in self.expected(name).items() if m.get(k, False if k == "on_disk" else None) != v]

    def factory_for(self, name: str) -> str:
        if name == "all":
            return str(self.store.get_info("index_factory", "Flat"))
        return "Flat"  # the known-unsafe subset is small and changes often: exact, and removals are cheap

    def on_disk_for(self, name: str) -> bool:
        return name == "all" and bool(self.store.get_info(ON_DISK_KEY, False))

    def check_file(self, name: str, m: dict[str, Any], *, full: bool = False) -> tuple[faiss.Index | None, str | None]:
        """Load the file(s) a manifest names, checking their sha256 first: (index, None), or (None, what is wrong).
        An on-disk index comes back with its lists memory-mapped; `full`: its .ivfdata is hashed whole even when large
        (otherwise by size and sampled blocks above ondisk.FULL_CHECK_BYTES)."""
        path = self.dir / str(m.get("file", ""))
        want = m.get("sha256")
        if not want:
            return None, f"index {name}: the manifest names no sha256 of {path.name} (older version): cannot trust it"
        on_disk = bool(m.get("on_disk"))
        try:
            before = path.stat()
            if on_disk:  # small (quantizer and list offsets): read once, hashed and parsed from the same bytes
                data = path.read_bytes()
                got = hashlib.sha256(data).hexdigest()
            else:
                got = ondisk.full_digest(path)
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
        if on_disk:
            lists = self.dir / str(m.get("ivfdata", ""))
            problem = ondisk.check_ivfdata(lists, m, full=full)
            if problem:
                return None, f"index {name}: {problem}"
            try:
                index = ondisk.open_mapped(data, lists)
            except RuntimeError as e:
                return None, f"index {name}: {lists.name} cannot be mapped ({str(e).splitlines()[-1]})"
        kind_ok = ondisk.on_disk_lists(index) is not None if on_disk else isinstance(index, faiss.IndexIDMap2)
        if index.ntotal != m.get("count") or index.d != m.get("dim") or not kind_ok:
            return None, f"index {name}: {path.name} disagrees with its manifest (count, dim or id map)"
        return index, None

    def load(self, name: str) -> Snapshot | None:
        """The snapshot on disk, if its manifest and file agree with each other and with the store; else None.
        A file that fails its checksum is recorded in `problems` (and never returned)."""
        m = self.read_manifest(name)
        if m is None:
            return None
        stale = self.stale_keys(name, m)
        if stale:
            log.info("index %s is stale (%s): rebuilding", name, stale)
            return None
        index, problem = self.check_file(name, m)
        if index is None:
            log.error("%s: rebuilding it from SQLite", problem)
            self.problems[name] = str(problem)
            return None
        self.problems.pop(name, None)
        return self._refined(Snapshot(name, index, m, base=index if m.get("on_disk") else None), m.get("factory"))

    def _refined(self, snap: Snapshot, factory: object) -> Snapshot:
        """A lossy index over all images re-ranks its candidates with the exact vectors of SQLite."""
        factor = refine_factor(str(factory or "Flat"))
        if snap.name == "all" and factor > 1:
            snap.refine = (factor, self.store.vectors)
        return snap

    def disk_generation(self, name: str) -> int:
        return int((self.read_manifest(name) or {}).get("generation", 0) or 0)

    def save(self, snap: Snapshot) -> None:
        """Write the index under a new generation (an on-disk one: its .ivfdata moved into place first), then its
        manifest (the commit point), then drop old files. A failed write (IndexWriteFailed) leaves the previous
        generation in place and no file at the new names."""
        if snap.on_disk and snap.pending is None:
            raise InvalidArgument("internal: an on-disk index is written when it is built or merged, not in place")
        gen = max(snap.generation, self.disk_generation(snap.name)) + 1
        fname = f"{snap.name}.{gen:06d}.faiss"
        lname = f"{snap.name}.{gen:06d}.ivfdata"
        extra: dict[str, Any] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if snap.pending is not None:
                lists = ondisk.on_disk_lists(snap.index)
                assert lists is not None
                lists.filename = lname  # what the .faiss records: the file beside it
                extra = {
                    "ivfdata": lname,
                    "ivfdata_size": snap.pending.stat().st_size,
                    "ivfdata_sha256": ondisk.full_digest(snap.pending),
                    "ivfdata_sample_sha256": ondisk.sample_digest(snap.pending),
                }
                os.chmod(snap.pending, 0o600)  # as the other files (mkstemp)
                os.replace(snap.pending, self.dir / lname)
                fsync_dir(self.dir)
            data = faiss.serialize_index(snap.index).data  # a view: written and hashed without a bytes copy
            manifest = {
                **self.expected(snap.name),
                **{k: v for k, v in snap.manifest.items() if k in ("watermark", "members_hash")},
                "generation": gen,
                "file": fname,
                "count": int(snap.index.ntotal),
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                **extra,
            }
            atomic_write_bytes(self.dir / fname, data)
            atomic_write_bytes(self.manifest_path(snap.name), json.dumps(manifest, indent=1).encode())
        except OSError as e:
            with contextlib.suppress(OSError):
                if (self.read_manifest(snap.name) or {}).get("file") != fname:
                    for p in (self.dir / fname, self.dir / lname, snap.pending):
                        if p is not None and p.exists():
                            p.unlink()
            raise IndexWriteFailed(
                f"cannot write the FAISS index {fname} in {self.dir} ({e.strerror or e}); the previous index is "
                "kept and SQLite holds everything: free some space, then run `nsfw-index rebuild`"
            ) from e
        if snap.pending is not None:  # served from the files just written, mapped read-only
            snap.index = snap.base = ondisk.open_mapped(data, self.dir / lname)
            snap.delta, snap.pending = None, None
            set_search_params(snap.index, self.settings)
        snap.manifest = manifest
        self.problems.pop(snap.name, None)
        self._drop_old(snap.name, {fname, lname})

    def _drop_old(self, name: str, keep: set[str]) -> None:
        """Older generations, and temp files of killed writers (we hold the lock)."""
        for old in self.dir.iterdir():
            if old.name.startswith((f"{name}.", f".{name}.")) and old.suffix in LEFTOVERS and old.name not in keep:
                with contextlib.suppress(OSError):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()

    def verify(self) -> list[str]:
        """Problems with the FAISS files on disk (empty when fine): unreadable manifests, files that are missing,
        unreadable or fail their sha256 (an .ivfdata hashed in full), or disagree with their manifest. A missing or
        stale index is no problem (it is rebuilt from SQLite on open)."""
        out: list[str] = []
        for name in INDEX_NAMES:
            path = self.manifest_path(name)
            if not path.exists():
                continue
            m = self.read_manifest(name)
            if m is None:
                out.append(f"index {name}: {path.name} is not a readable manifest")
                continue
            _, problem = self.check_file(name, m, full=True)
            if problem:
                out.append(problem)
        return out

    # -- the index over all images --
    def build_all(self, *, factory: str | None = None, on_disk: bool | None = None, persist: bool = False) -> Snapshot:
        """A new index over every stored vector (`factory`, `on_disk`: these instead of the store's). On disk, the
        lists are written shard by shard: beside the store's files when `persist` (then `pending` until saved), else
        into a private temp directory, mapped and deleted."""
        factory = factory or self.factory_for("all")
        on_disk = self.on_disk_for("all") if on_disk is None else on_disk
        dim = self.store.embedding_dim()
        index = make_index(factory, dim, wrap=not on_disk)
        if on_disk:
            ondisk.require_on_disk_capable(index, factory)
        watermark = self.store.max_image_id()
        if not index.is_trained:
            train = ondisk.sample_vectors(self.store, watermark, ondisk.training_size(index, self.store.count_images()))
            if len(train) == 0:
                raise InvalidArgument(f"index factory {factory!r} needs training vectors but the store is empty")
            ondisk.skip_polysemous(index)
            try:
                index.train(train)
            except RuntimeError as e:
                raise InvalidArgument(
                    f"training {factory!r} on {len(train)} vectors failed ({faiss_reason(e)}); "
                    "use a smaller factory (fewer IVF lists than vectors, ideally 39+ vectors per list) or Flat"
                ) from None
            del train
        if not on_disk:
            for ids, vecs in self.store.iter_vectors(0, watermark):
                index.add_with_ids(vecs, ids)
            return self._refined(Snapshot("all", index, {"watermark": watermark}), factory)
        if self.store.count_images(watermark) == 0:
            raise InvalidArgument("an on-disk index needs vectors, but the store is empty")
        index, pending = ondisk.build_in(index, self.store.iter_vectors(0, watermark), self.dir if persist else None)
        return self._refined(Snapshot("all", index, {"watermark": watermark}, base=index, pending=pending), factory)

    def merge_delta(self, snap: Snapshot) -> Snapshot:
        """An on-disk snapshot whose lists hold the base's and the delta's, as a new .ivfdata (pending until saved)."""
        assert snap.base is not None and snap.delta is not None
        target = self.dir / f".all.{os.getpid()}.ivfdata.tmp"
        try:
            index = ondisk.merged_with(snap.base, snap.delta, target)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return Snapshot("all", index, dict(snap.manifest), base=index, pending=target, refine=snap.refine)

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
            snap.add(vecs, ids)
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
        """The index over all images, caught up with SQLite (rebuilt when stale or damaged). `persist`: write it.
        On disk, rows added since the build are searched in an in-memory delta; a writer merges the delta into a new
        .ivfdata once it is large (ondisk.merge_due)."""
        snap = self.load("all")
        changed = False
        if snap is not None:
            try:
                changed = self.catch_up_all(snap) > 0
            except IndexMismatch as e:
                log.warning("%s: rebuilding", e)
                snap = None
        if snap is None:
            snap = self.build_all(persist=persist)
            snap.manifest["generation"] = self.disk_generation("all")  # stands in for the file on disk
            changed = True
        set_search_params(snap.index, self.settings)
        if persist and snap.on_disk:
            assert snap.base is not None
            if snap.pending is None and ondisk.merge_due(int(snap.base.ntotal), snap.delta_count):
                snap = self.merge_delta(snap)
            if snap.pending is not None:
                self.save(snap)
        elif persist and changed:
            self.save(snap)
        return snap

    def open_unsafe(self, *, persist: bool) -> Snapshot:
        snap = self.load("unsafe")
        rebuilt = snap is None
        snap, added, removed = self.sync_unsafe(snap, set(self.store.known_unsafe(self.settings)))
        if persist and (added or removed or rebuilt):
            self.save(snap)
        return snap

    def rebuild_unsafe(self) -> int:
        """Rebuild the known-unsafe file from SQLite (the caller holds the writer lock). Returns its count."""
        unsafe, _, _ = self.sync_unsafe(None, set(self.store.known_unsafe(self.settings)))
        self.save(unsafe)
        return int(unsafe.index.ntotal)

    def freshness(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        top = self.store.max_image_id()
        for name in INDEX_NAMES:
            m = self.read_manifest(name)
            if m is None:
                out[name] = {"exists": False}
                continue
            stale = self.stale_keys(name, m)
            damaged = None if stale else self.check_file(name, m)[1]  # a stale file is rebuilt anyway
            if damaged:
                stale.append("damaged")
            out[name] = {
                "exists": True,
                "generation": m.get("generation"),
                "count": m.get("count"),
                "factory": m.get("factory"),
                "on_disk": bool(m.get("on_disk")),
                "watermark": m.get("watermark"),
                "behind_by": (self.store.count_images() - self.store.count_images(int(m.get("watermark", 0))))
                if name == "all"
                else None,
                "fresh": not stale and (name != "all" or int(m.get("watermark", 0)) >= top),
                "stale_because": stale,
                "checksum": "missing" if not m.get("sha256") else ("mismatch" if damaged else "ok"),
                "damaged": damaged,
            }
            if m.get("on_disk"):
                out[name]["ivfdata"] = {"file": m.get("ivfdata"), "bytes": m.get("ivfdata_size")}
        return out
