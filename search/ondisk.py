"""Large stores in bounded memory: training samples and exact search streamed from SQLite, and on-disk IVF indexes
(inverted lists in an `.ivfdata` file: built shard by shard, merged, memory-mapped read-only, with an in-memory delta
for the rows added since)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from search.durable import fsync_path
from search.errors import InvalidArgument
from search.store import Store

#: k-means training points per IVF list (quality grows slowly past ~64, time linearly), and the fewest faiss accepts
#: without a warning (the cap below never cuts under it: training 65536 lists takes 2.6M vectors, 7.7 GB at 768-d)
TRAIN_PER_LIST, TRAIN_PER_LIST_MIN = 64, 39
#: at least this many training vectors (PQ and SQ codebooks); at most this many bytes of them in RAM
TRAIN_MIN, TRAIN_MAX_BYTES = 20_000, 2 << 30
#: codes + ids encoded in memory before a shard is written out and a new one started
SHARD_BYTES = 256 << 20
#: an .ivfdata up to this size is checksummed in full on every open; a larger one by its size and sampled blocks
#: (`nsfw-index verify` always reads it all)
FULL_CHECK_BYTES = 1 << 30
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 256, 1 << 16
#: a writer re-merges the in-memory delta into a new .ivfdata once it holds base/DELTA_MERGE_FRACTION rows,
#: bounded by these (every reader re-encodes the delta from SQLite when it opens the index)
DELTA_MERGE_FRACTION, DELTA_MERGE_MIN, DELTA_MERGE_MAX = 20, 10_000, 1_000_000


# -- sampling and exact search, streamed -------------------------------------------------------------------------------
def training_size(index: faiss.Index, count: int) -> int:
    """How many vectors to train `index` on, out of `count` stored: 64 per IVF list, within TRAIN_MAX_BYTES unless
    that leaves fewer than 39 per list."""
    ivf = ivf_of(index)
    lists = int(ivf.nlist) if ivf is not None else 0
    cap = max(TRAIN_MAX_BYTES // (4 * int(index.d)), TRAIN_PER_LIST_MIN * lists)
    return min(count, max(TRAIN_MIN, min(TRAIN_PER_LIST * lists, cap)))


def skip_polysemous(index: faiss.Index) -> None:
    """IVF-PQ factories train a polysemous code layout by default: only Hamming pre-filtering (`polysemous_ht`, never
    set here) uses it, and it takes most of the training time (IVF64,PQ8 on 20k vectors: 13 s, 4 s without)."""
    ivf = ivf_of(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else None
    if inner is not None and hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def sample_vectors(store: Store, upto: int, n: int, seed: int = 0) -> np.ndarray:
    """About `n` stored vectors (ids <= `upto`) drawn uniformly, never holding more than ~2n in memory: a small store is
    read whole and subsampled; a large one is read in short runs of ids starting at random places."""
    count = store.count_images(upto)
    dim = store.embedding_dim()
    rng = np.random.default_rng(seed)
    if n <= 0 or count == 0:
        return np.zeros((0, dim), np.float32)
    if count <= 2 * n:
        x = np.concatenate([v for _, v in store.iter_vectors(0, upto)])
        return x[np.sort(rng.choice(len(x), min(n, len(x)), replace=False))]
    run = 64
    starts = np.unique(rng.integers(0, max(1, upto - run), math.ceil(n / run * upto / count * 1.1)))
    parts, got, last = [], 0, -1
    for s in starts.tolist():
        if s < last:  # overlapping runs would draw rows twice
            continue
        for _, v in store.iter_vectors(s, min(upto, s + run), chunk=run):
            parts.append(v)
            got += len(v)
        last = s + run
    x = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return x[np.sort(rng.choice(len(x), n, replace=False))] if len(x) > n else x


def exact_knn(store: Store, queries: np.ndarray, k: int, upto: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` over the stored vectors (ids <= `upto`), streamed chunk by chunk:
    (similarities, ids), -1 where the store holds fewer than k."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vecs in store.iter_vectors(0, upto):
        sims, rows = faiss.knn(queries, vecs, min(k, len(vecs)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1))
    heap.finalize()
    return heap.D, heap.I


# -- on-disk IVF -------------------------------------------------------------------------------------------------------
def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF inside an index (through IDMap and pre-transform wrappers), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def require_on_disk_capable(index: faiss.Index, factory: str) -> None:
    if ivf_of(index) is None or isinstance(index, faiss.IndexIVFPQR):
        raise InvalidArgument(
            f"an on-disk index needs an IVF factory (e.g. IVF4096,PQ64 or IVF65536_HNSW32,PQ64), not {factory!r}; "
            "other index types live in memory (`nsfw-index rebuild --in-memory`)"
        )


def on_disk_lists(index: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    ivf = ivf_of(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)  # type: ignore[arg-type]  # faiss's SWIG stubs
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


@contextlib.contextmanager
def _quiet_c_stdout() -> Iterator[None]:
    """faiss printf()s progress ("resizing ... bytes") to stdout while merging: away from `--json` output."""
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _merge(trained: faiss.Index, lists: list[faiss.InvertedLists], target: Path) -> faiss.Index:
    """`trained` (empty) with the union of `lists` as its inverted lists, written to `target` (writable mapping)."""
    ivf = ivf_of(trained)
    assert ivf is not None and trained.ntotal == 0
    out = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(target))
    vec = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # faiss's SWIG stubs
    for il in lists:
        vec.push_back(il)
    with _quiet_c_stdout():
        ntotal = out.merge_from_multiple(vec.data(), vec.size(), False, False)
    ivf.replace_invlists(out, True)
    out.this.disown()  # type: ignore[attr-defined]  # owned by the index now
    trained.ntotal = ivf.ntotal = ntotal
    fsync_path(target)
    return trained


def build(trained: faiss.Index, batches: Iterable[tuple[np.ndarray, np.ndarray]], target: Path) -> faiss.Index:
    """Encode (ids, vectors) batches with the trained empty IVF `trained` shard by shard (at most SHARD_BYTES in
    memory: each full shard is written beside `target`, memory-mapped back for the merge), then merge every shard into
    the inverted-list file `target`. Returns the populated index (its lists mapped from `target`)."""
    ivf = ivf_of(trained)
    assert ivf is not None
    per_shard = max(1, SHARD_BYTES // (int(ivf.code_size) + 8))
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.shards.", suffix=".tmp", dir=target.parent))
    try:
        names: list[Path] = []
        shard: faiss.Index | None = None
        for ids, vecs in batches:
            if shard is None:
                shard = faiss.clone_index(trained)
            shard.add_with_ids(vecs, ids)
            if shard.ntotal >= per_shard:
                names.append(work / f"{len(names):05d}.faiss")
                faiss.write_index(shard, str(names[-1]))
                shard = None
        shards = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in names]  # mapped, not read into memory
        if shard is not None:
            shards.append(shard)
        return _merge(trained, [faiss.extract_index_ivf(s).invlists for s in shards], target)  # type: ignore[misc]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_in(
    trained: faiss.Index, batches: Iterable[tuple[np.ndarray, np.ndarray]], directory: Path | None
) -> tuple[faiss.Index, Path | None]:
    """`build` into a temp file of `directory` (the store's FAISS directory: returns the index and that file, to be
    saved), or with `directory` None into a private temp directory, mapped read-only and deleted (a reader's rebuild:
    returns the index and None)."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    where = directory if directory is not None else private_dir()
    target = where / f".all.{os.getpid()}.ivfdata.tmp"
    try:
        index = build(trained, batches, target)
    except BaseException:
        target.unlink(missing_ok=True)
        if directory is None:
            shutil.rmtree(where, ignore_errors=True)
        raise
    if directory is not None:
        return index, target
    return private_copy(index, target), None


def merged_with(base: faiss.Index, delta: faiss.Index, target: Path) -> faiss.Index:
    """A new index whose lists (in `target`) are `base`'s followed by `delta`'s: no retraining, no re-encoding."""
    trained = empty_like(base)
    base_ivf, delta_ivf = ivf_of(base), ivf_of(delta)
    assert base_ivf is not None and delta_ivf is not None
    return _merge(trained, [base_ivf.invlists, delta_ivf.invlists], target)  # type: ignore[list-item]


def empty_like(index: faiss.Index) -> faiss.Index:
    """An empty in-memory copy of an on-disk IVF (same quantizer and codec): the delta of rows added since."""
    copy = faiss.deserialize_index(faiss.serialize_index(index), faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = ivf_of(copy)
    assert ivf is not None
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # type: ignore[attr-defined]  # owned by the index now
    copy.ntotal = ivf.ntotal = 0
    return copy


def open_mapped(index_bytes: bytes | memoryview | Path, ivfdata: Path) -> faiss.Index:
    """An on-disk IVF opened read-only, its lists memory-mapped from `ivfdata` (the size is checked first: a mapping
    past the end of a truncated file would crash on access)."""
    flags = faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
    if isinstance(index_bytes, Path):
        index = faiss.read_index(str(index_bytes), flags)
    else:
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8), flags)
    lists = on_disk_lists(index)
    if lists is None:
        raise RuntimeError("not an on-disk IVF index")
    size = ivfdata.stat().st_size
    if size != lists.totsize:
        raise RuntimeError(f"{ivfdata.name} holds {size} bytes, the index expects {lists.totsize}")
    lists.filename = str(ivfdata)
    lists.read_only = True
    lists.prefetch_nthread = 0  # no threads started per query: the page cache serves the lists
    lists.do_mmap()
    return index


def private_copy(index: faiss.Index, ivfdata: Path) -> faiss.Index:
    """A read-only mapping of a freshly built index whose files are then deleted (a reader's rebuild: nothing is left
    in the store, nor in the temp directory once the index is closed)."""
    lists = on_disk_lists(index)
    assert lists is not None
    lists.filename = str(ivfdata)
    out = open_mapped(faiss.serialize_index(index).tobytes(), ivfdata)
    shutil.rmtree(ivfdata.parent, ignore_errors=True)
    return out


def private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="nsfw-index-ivf-"))


def with_delta(base: faiss.Index, delta: faiss.Index) -> faiss.IndexShards:
    """The base and its delta searched as one index (results merged by similarity). The caller keeps both alive."""
    both = faiss.IndexShards(base.d, False, False)  # type: ignore[call-arg]  # (dim, threaded, successive_ids)
    both.add_shard(base)
    both.add_shard(delta)
    return both


def merge_due(base_count: int, delta_count: int) -> bool:
    limit = min(DELTA_MERGE_MAX, max(DELTA_MERGE_MIN, base_count // DELTA_MERGE_FRACTION))
    return delta_count >= limit


def list_ids(index: faiss.Index) -> np.ndarray:
    """Every id in an IVF index's lists (on disk: read through the mapping)."""
    ivf = ivf_of(index)
    assert ivf is not None
    lists: Any = ivf.invlists
    out = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist) if lists.list_size(i)
    ]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


# -- the .ivfdata file -------------------------------------------------------------------------------------------------
def check_ivfdata(path: Path, m: dict[str, Any], *, full: bool) -> str | None:
    """What is wrong with the .ivfdata a manifest names (None: fine): its size, then its sha256, in full when `full`
    or the file is small, else over sampled blocks."""
    try:
        size = path.stat().st_size
        if size != m.get("ivfdata_size"):
            return f"{path.name} is damaged: {size} bytes, manifest says {m.get('ivfdata_size')}"
        whole = full or size <= FULL_CHECK_BYTES
        got = full_digest(path) if whole else sample_digest(path)
    except OSError as e:
        return f"{path.name} is unreadable ({e.strerror or e})"
    want = m.get("ivfdata_sha256" if whole else "ivfdata_sample_sha256")
    if got != want:
        how = "sha256" if whole else "sampled-block sha256"
        return f"{path.name} is damaged: {how} {got[:16]}... != manifest {str(want)[:16]}..."
    return None


def full_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sample_digest(path: Path) -> str:
    """sha256 of the size and SAMPLE_BLOCKS blocks at evenly spaced offsets: cheap, catches truncation and most damage
    to a large file without reading it all."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(size * i // SAMPLE_BLOCKS)
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()
