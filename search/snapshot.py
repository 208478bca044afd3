"""FAISS index objects: the factory, search parameters, the ids an index holds, and `Snapshot` (one loaded index;
on disk: a memory-mapped base and an in-memory delta searched together)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from search import ondisk
from search.errors import InvalidArgument, NotFound
from search.settings import Settings

#: candidates per wanted result that a lossy index (PQ codes) is asked for, re-ranked with the exact stored vectors
REFINE_FACTOR = 4


def refine_factor(factory: str) -> int:
    """How many candidates per result to re-rank exactly: REFINE_FACTOR for product-quantised codes (PQ64 on 768-d
    vectors alone: recall@10 ~0.65), 1 (none) for exact or 8-bit codes and for factories refining themselves."""
    return REFINE_FACTOR if factory.split(",")[-1].strip().upper().startswith("PQ") else 1


def make_index(factory: str, dim: int, *, wrap: bool = True) -> faiss.Index:
    """An index over `dim`-d unit vectors, inner product. `wrap`: in an IDMap2, so that any factory takes SQLite ids
    (an on-disk IVF takes them itself and is not wrapped)."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InvalidArgument(
            f"FAISS cannot build index factory {factory!r} ({faiss_reason(e)}); examples of factories: Flat (exact), "
            "HNSW32, IVF2048,SQ8, IVF65536_HNSW32,PQ64 (https://github.com/facebookresearch/faiss/wiki/The-index-factory)"
        ) from None
    return faiss.IndexIDMap2(base) if wrap else base


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run one query's search on the calling thread alone. An OpenMP team gains nothing on a single query and its
    barrier waits cost a lot once the cores are busy (Flat over 100k 768-d vectors, 2 cores under load: 16 ms on one
    thread, 96 ms with a team of 2). OpenMP's thread count is per calling thread: it is restored after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search_one(index: faiss.Index, q: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` of one query (similarities, ids) under `one_thread`."""
    with one_thread():
        return index.search(q, k, params=params) if params is not None else index.search(q, k)


def faiss_reason(e: BaseException) -> str:
    """The reason in a FAISS exception, without its C++ location ("Error in ... at file:line: Error: ...")."""
    return str(e).splitlines()[-1].rsplit("Error: ", 1)[-1].strip() if str(e) else repr(e)


def _leaves(index: Any) -> list[faiss.Index]:
    """The indexes that search: inside an IDMap, and each shard of a base + delta pair."""
    if isinstance(index, faiss.IndexShards):
        shards: Any = index  # faiss's SWIG stubs lack count() and at()
        return [leaf for i in range(shards.count()) for leaf in _leaves(faiss.downcast_index(shards.at(i)))]
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        return [faiss.downcast_index(index.index)]
    return [index]


def set_search_params(index: faiss.Index, settings: Settings) -> None:
    for leaf in _leaves(index):
        inner = ondisk.ivf_of(leaf) or leaf
        if settings.nprobe is not None and hasattr(inner, "nprobe"):
            inner.nprobe = settings.nprobe
        elif hasattr(inner, "nprobe") and inner.nprobe == 1:
            inner.nprobe = 16  # the faiss default of 1 gives poor recall
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = settings.ef_search or max(64, inner.hnsw.efSearch)


def index_ids(index: Any) -> np.ndarray:
    """The SQLite ids an index holds (an IDMap's map, an IVF's lists, or both shards of a base + delta)."""
    if isinstance(index, faiss.IndexShards):
        shards: Any = index
        parts = [index_ids(faiss.downcast_index(shards.at(i))) for i in range(shards.count())]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64) if index.ntotal else np.zeros(0, np.int64)  # type: ignore[attr-defined,arg-type,call-arg,unused-ignore]  # faiss's SWIG stubs
    return ondisk.list_ids(index) if index.ntotal else np.zeros(0, np.int64)


@dataclass
class Snapshot:
    """One loaded FAISS index and the manifest describing it. An on-disk index is `base` (its lists memory-mapped
    read-only) plus `delta`, the rows added since, in memory; `index` searches both. `pending`: an on-disk index built
    or merged under this temp name and not yet saved."""

    name: str
    index: faiss.Index
    manifest: dict[str, Any] = field(default_factory=dict)
    base: faiss.Index | None = None
    delta: faiss.Index | None = None
    pending: Path | None = None
    #: re-ranking of a lossy index: (candidates per result, the exact vectors of ids, from SQLite)
    refine: tuple[int, Callable[[list[int]], np.ndarray]] | None = None

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k of one query (similarities, ids; -1 past the end), on one thread; a lossy index's candidates are
        re-ranked with the exact stored vectors (k * factor of them)."""
        if self.refine is None or self.refine[0] <= 1:
            return search_one(self.index, q, k)
        factor, vectors = self.refine
        _, found = search_one(self.index, q, min(int(self.index.ntotal), k * factor))
        ids = [int(i) for i in found[0] if i >= 0]
        try:
            sims = vectors(ids) @ q[0] if ids else np.zeros(0, np.float32)
        except NotFound:  # an image deleted since the snapshot (it is rebuilt): the unrefined answer meanwhile
            return search_one(self.index, q, k)
        order = np.argsort(-sims, kind="stable")[:k]
        out_sims, out_ids = np.full((1, k), -np.inf, np.float32), np.full((1, k), -1, np.int64)
        out_sims[0, : len(order)], out_ids[0, : len(order)] = sims[order], np.asarray(ids, np.int64)[order]
        return out_sims, out_ids

    @property
    def generation(self) -> int:
        return int(self.manifest.get("generation", 0))

    @property
    def on_disk(self) -> bool:
        return self.base is not None

    @property
    def delta_count(self) -> int:
        return int(self.delta.ntotal) if self.delta is not None else 0

    def add(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        """Add rows: into the index, or for an on-disk one into its delta (its mapped lists are never written)."""
        if self.base is None:
            self.index.add_with_ids(vecs, ids)
            return
        if self.delta is None:
            self.delta = ondisk.empty_like(self.base)
            ivf, base_ivf = ondisk.ivf_of(self.delta), ondisk.ivf_of(self.base)
            assert ivf is not None and base_ivf is not None
            ivf.nprobe = base_ivf.nprobe
            self.index = ondisk.with_delta(self.base, self.delta)
        self.delta.add_with_ids(vecs, ids)
        self.index.syncWithSubIndexes()  # type: ignore[attr-defined]  # faiss's SWIG stubs
