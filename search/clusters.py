"""Near-duplicate groups and k-means clusters of a store: computed by `run_clustering`, kept in SQLite, read with flags
that follow the current labels.

Near-duplicate groups are the connected components of the graph whose edges are the pairs of images with cosine
similarity >= T (default `Settings.near_duplicate_threshold`, 0.90). No N x N matrix is ever formed:

- N <= EXACT_MAX_IMAGES (200k): exact. The vectors are cut into tiles of TILE rows; each tile gets its own FAISS
  `IndexFlatIP` and is range-searched by the rows up to its end, so every pair is scored once (upper triangle, BLAS).
  Cost N^2·d/2 multiply-adds: measured 54 s for 100k x 768 on 2 cores (benchmarks/cluster_scale.py).
- larger N: approximate, an inverted-file (IVF) partition: spherical k-means into nlist = 2·sqrt(N) cells, every
  image listed in its IVF_NPROBE nearest cells, and the images whose nearest cell is c range-searched (IndexFlatIP,
  BLAS) against everything listed in c. A pair is scored when one image's nearest cell is among the other's nprobe
  nearest; near-duplicates are far closer to each other than to anything else, so they nearly always are (measured
  pair recall: see benchmarks/cluster_scale.py --recall). Cost ~ N·d·(nprobe·N/nlist + nlist). A kNN search per image
  on an IVF index was tried first and dropped: each query streams its probed lists from memory, so at 100k it was
  slower than the exact path, and k caps how many near-duplicates an image can link to.

Edges are folded into a spanning forest as they arrive (scipy.sparse.csgraph.connected_components), so memory stays
O(N + edges of one tile) even when a huge family makes the graph dense.

Exact duplicates (one content at several paths) are one image row already, so group members are image ids, and every
group records how many stored paths (copies) it covers. A component of one image is a group only when that image has
two or more paths (exact duplicates); other singletons are not stored.

Semantic clusters: spherical `faiss.Kmeans` (seed KMEANS_SEED, KMEANS_NITER iterations, at most 256 training points
per centroid), every image assigned to its nearest centroid, so the assignments cover every image exactly once. Default
K = clamp(round(sqrt(N/2)), 1, MAX_K) and K <= N; empty clusters are dropped.

Representative of a group or cluster: the medoid under squared Euclidean distance on the unit sphere, i.e. the member
with the highest mean cosine similarity to all members. Since sum_j x_i·x_j = x_i·(sum_j x_j) this is exact in O(n·d)
for any size (it is the member nearest to the members' mean direction); ties go to the lowest image id. Each member
stores its similarity to the representative; `cohesion` is the mean of those.

Flags follow labels: unsafe counts are computed when results are READ, from `Store.known_unsafe(settings)`, so labelling
an image after clustering flags its group and cluster at once (and `safe` unflags). Score means and maxima are stored
per level (an image's scores never change).

Incremental behaviour: a run on a store whose max image id, image count and deletion epoch match the last clustering,
with the same threshold and K, returns "up to date" without work. Anything else recomputes everything and says why:
k-means centroids move when images arrive, so results are recomputed, not patched.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from search.errors import InvalidArgument, NotFound, StoreCorrupt
from search.settings import LEVELS, Settings
from search.store import Store, utcnow

EXACT_MAX_IMAGES = 200_000  # above this the near-duplicate graph comes from an approximate (IVF) kNN search
TILE = 4096  # rows per exact range-search tile (bounds the memory of one tile's results)
IVF_NPROBE = 4  # cells each image is listed in, in the approximate graph
IVF_POINTS_PER_LIST = 64  # training sample for the IVF quantizer
KMEANS_NITER = 20
KMEANS_SEED = 1234
MAX_K = 4096
KINDS = ("group", "cluster")
SORTS = ("size", "unsafe")
MAX_PER_PAGE = 1000
_FOREST_FLUSH_EDGES = 4_000_000  # fold pending edges into the spanning forest past this many

Log = Callable[[str], None]


def default_k(n: int) -> int:
    """K = clamp(round(sqrt(N/2)), 1, 4096), and never more than N."""
    if n <= 0:
        return 0
    return int(min(n, max(1, min(MAX_K, round(math.sqrt(n / 2))))))


def ivf_nlist(n: int) -> int:
    """Inverted lists for the approximate graph: 2·sqrt(N), at least 1 and at most N/8."""
    return int(max(1, min(round(2 * math.sqrt(n)), n // 8 or 1)))


# -- vectors -----------------------------------------------------------------------------------------------------------
def load_vectors(store: Store, upto_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, L2-normalised float32 vectors) of every image with id <= upto_id (default: all), in id order."""
    upto = store.max_image_id() if upto_id is None else int(upto_id)
    n = store.count_images(upto)
    d = store.embedding_dim()
    ids = np.empty(n, np.int64)
    x = np.empty((n, d), np.float32)
    pos = 0
    for chunk_ids, vecs in store.iter_vectors(0, upto):
        m = min(len(chunk_ids), n - pos)
        ids[pos : pos + m] = chunk_ids[:m]
        x[pos : pos + m] = vecs[:m]
        pos += m
    ids, x = ids[:pos], np.ascontiguousarray(x[:pos])
    if len(x):
        faiss.normalize_L2(x)
    return ids, x


# -- the near-duplicate graph ------------------------------------------------------------------------------------------
def _as_threshold(threshold: float) -> np.float32:
    t = float(threshold)
    if not -1.0 <= t <= 1.0 or math.isnan(t):
        raise InvalidArgument(f"the near-duplicate threshold is a cosine similarity in [-1, 1], not {threshold!r}")
    return np.float32(t)


def _exact_edges(x: np.ndarray, threshold: float, tile: int = TILE) -> Iterator[tuple[np.ndarray, ...]]:
    """(rows, cols, sims) with rows < cols and sims >= threshold, tile by tile, every pair scored once."""
    n, d = x.shape
    t32 = _as_threshold(threshold)
    radius = float(np.nextafter(t32, np.float32(-np.inf)))  # FAISS keeps sims > radius; we want >= t
    for j0 in range(0, n, tile):
        j1 = min(n, j0 + tile)
        index = faiss.IndexFlatIP(d)
        index.add(x[j0:j1])
        for i0 in range(0, j1, tile):
            i1 = min(j1, i0 + tile)
            lims, sims, cols = index.range_search(x[i0:i1], radius)
            rows = np.repeat(np.arange(i0, i1, dtype=np.int64), np.diff(lims).astype(np.int64))
            cols = cols.astype(np.int64) + j0
            keep = (cols > rows) & (sims >= t32)
            yield rows[keep], cols[keep], sims[keep]


def _ivf_edges(
    x: np.ndarray, threshold: float, *, nprobe: int = IVF_NPROBE, tile: int = TILE, seed: int = 0
) -> Iterator[tuple[np.ndarray, ...]]:
    """(rows, cols, sims) with sims >= threshold, scored only within IVF cells (approximate, BLAS throughout).

    An inverted-file partition: spherical k-means (FAISS) into nlist = 2·sqrt(N) cells, trained on IVF_POINTS_PER_LIST
    points per cell, and every vector listed in its `nprobe` nearest cells. The images whose nearest cell is c are then
    range-searched against an IndexFlatIP of every image listed in c. A pair is scored when one image's nearest cell
    is among the other's `nprobe` nearest: near-duplicates, far closer to each other than to anything else, nearly
    always are. Unlike one kNN search per image (memory-bound: every query streams its probed lists), each cell is one
    matrix product, and there is no cap on neighbours, so a large family is found whole."""
    n, d = x.shape
    t32 = _as_threshold(threshold)
    radius = float(np.nextafter(t32, np.float32(-np.inf)))
    nlist = ivf_nlist(n)
    km = faiss.Kmeans(
        d,
        nlist,
        niter=10,
        seed=seed,
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=IVF_POINTS_PER_LIST,
        verbose=False,
    )
    km.train(x)
    p = min(nprobe, nlist)
    _, cells = km.index.search(x, p)
    listed_cells = cells.reshape(-1).astype(np.int64)
    listed_rows = np.repeat(np.arange(n, dtype=np.int64), p)
    order = np.argsort(listed_cells, kind="stable")
    listed_rows = listed_rows[order]
    bounds = np.searchsorted(listed_cells[order], np.arange(nlist + 1))
    primary = cells[:, 0].astype(np.int64)
    q_order = np.argsort(primary, kind="stable")
    q_bounds = np.searchsorted(primary[q_order], np.arange(nlist + 1))
    del cells, listed_cells, order
    for c in range(nlist):
        queries = q_order[q_bounds[c] : q_bounds[c + 1]]
        members = listed_rows[bounds[c] : bounds[c + 1]]
        if len(queries) == 0 or len(members) < 2:
            continue
        index = faiss.IndexFlatIP(d)
        index.add(x[members])
        for i0 in range(0, len(queries), tile):
            q = queries[i0 : i0 + tile]
            lims, sims, cols = index.range_search(x[q], radius)
            rows = np.repeat(q, np.diff(lims).astype(np.int64))
            cols = members[cols]
            keep = (rows != cols) & (sims >= t32)
            yield rows[keep], cols[keep], sims[keep]


def graph_method(n: int, method: str = "auto") -> str:
    if method == "auto":
        return "exact" if n <= EXACT_MAX_IMAGES else "ivf"
    if method not in ("exact", "ivf"):
        raise InvalidArgument(f"method must be auto, exact or ivf, not {method!r}")
    return method


def similarity_edges(x: np.ndarray, threshold: float, *, method: str = "auto") -> Iterator[tuple[np.ndarray, ...]]:
    """Blocks of (rows, cols, sims): the pairs of rows of `x` with cosine similarity >= threshold."""
    if graph_method(len(x), method) == "exact":
        return _exact_edges(x, threshold)
    return _ivf_edges(x, threshold)


class _Forest:
    """Connected components of a graph fed in edge blocks, with memory O(N + pending edges)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.pending = 0
        self.edges = 0
        self.labels = np.arange(n, dtype=np.int64)
        self.count = n

    def add(self, rows: np.ndarray, cols: np.ndarray) -> None:
        if len(rows):
            self.rows.append(rows)
            self.cols.append(cols)
            self.pending += len(rows)
            self.edges += len(rows)
            if self.pending >= _FOREST_FLUSH_EDGES:
                self._fold()

    def _fold(self) -> None:
        if not self.pending:
            return
        # the current components as a star forest (each node -> its component's first node), plus the new edges
        first = np.unique(self.labels, return_index=True)[1]
        root = first[self.labels]
        nodes = np.arange(self.n, dtype=np.int64)
        star = root != nodes
        r = np.concatenate([nodes[star], *self.rows])
        c = np.concatenate([root[star], *self.cols])
        graph = scipy.sparse.coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(self.n, self.n)).tocsr()
        self.count, labels = connected_components(graph, directed=False)
        self.labels = labels.astype(np.int64)
        self.rows, self.cols, self.pending = [], [], 0

    def components(self) -> tuple[int, np.ndarray]:
        """(number of components, label per node 0..count-1)."""
        self._fold()
        return self.count, self.labels


def component_labels(x: np.ndarray, threshold: float, *, method: str = "auto") -> tuple[int, np.ndarray, int]:
    """(components, label per row, edges seen) of the near-duplicate graph of `x` at `threshold`."""
    forest = _Forest(len(x))
    for rows, cols, _ in similarity_edges(x, threshold, method=method):
        forest.add(rows, cols)
    count, labels = forest.components()
    return count, labels, forest.edges


def threshold_sweep(
    x: np.ndarray, thresholds: Sequence[float], *, method: str = "auto", max_images: int = 20_000, seed: int = 0
) -> list[dict[str, Any]]:
    """Groups against T, to help pick T: for each threshold, the number of groups (components of >= 2 images), the
    images in them and the largest and mean group size. One graph at min(thresholds) serves every T, so a store
    larger than `max_images` is swept on a random sample of that many images (`sampled` says so)."""
    if not len(thresholds):
        return []
    n = len(x)
    sampled = n > max_images
    if sampled:
        x = x[np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))]
    lo = min(float(t) for t in thresholds)
    blocks = list(similarity_edges(x, lo, method=method))
    rows = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.int64)
    cols = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int64)
    sims = np.concatenate([b[2] for b in blocks]) if blocks else np.zeros(0, np.float32)
    out = []
    for t in thresholds:
        keep = sims >= _as_threshold(t)
        graph = scipy.sparse.coo_matrix(
            (np.ones(int(keep.sum()), np.int8), (rows[keep], cols[keep])), shape=(len(x), len(x))
        ).tocsr()
        _, labels = connected_components(graph, directed=False)
        sizes = np.bincount(labels)
        groups = sizes[sizes >= 2]
        out.append(
            {
                "threshold": float(t),
                "groups": len(groups),
                "grouped_images": int(groups.sum()),
                "largest": int(groups.max()) if len(groups) else 0,
                "mean_size": float(groups.mean()) if len(groups) else 0.0,
                "pairs": int(keep.sum()),
                "images": len(x),
                "sampled": sampled,
            }
        )
    return out


# -- k-means -----------------------------------------------------------------------------------------------------------
def kmeans_labels(x: np.ndarray, k: int, *, niter: int = KMEANS_NITER, seed: int = KMEANS_SEED) -> np.ndarray:
    """Spherical k-means (FAISS), then every row assigned to its nearest centroid: a label 0..k-1 per row."""
    n, d = x.shape
    k = int(min(k, n))
    if k <= 1:
        return np.zeros(n, np.int64)
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
        verbose=False,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.reshape(-1).astype(np.int64)


# -- representatives and per-cluster statistics ------------------------------------------------------------------------
def _rowwise_dot(
    a: np.ndarray, rows_a: np.ndarray, b: np.ndarray, rows_b: np.ndarray, chunk: int = 32768
) -> np.ndarray:
    out = np.empty(len(rows_a), np.float32)
    for i in range(0, len(rows_a), chunk):
        out[i : i + chunk] = np.einsum("ij,ij->i", a[rows_a[i : i + chunk]], b[rows_b[i : i + chunk]])
    return out


@dataclass
class Partition:
    """Sets of rows of X: `rows[i]` belongs to set `labels[i]` (0..m-1, every set non-empty)."""

    rows: np.ndarray
    labels: np.ndarray
    m: int

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.m)


def representatives(x: np.ndarray, part: Partition) -> tuple[np.ndarray, np.ndarray]:
    """(representative row per set, similarity of each member to its set's representative).

    The representative is the member with the highest mean cosine similarity to its set (exact medoid under squared
    Euclidean distance on the sphere), computed as argmax x_i·(sum of the set), ties to the lowest row."""
    n = len(x)
    indicator = scipy.sparse.csr_matrix(
        (np.ones(len(part.rows), np.float32), (part.labels, part.rows)), shape=(part.m, n)
    )
    sums = np.asarray(indicator @ x, dtype=np.float32)
    score = _rowwise_dot(x, part.rows, sums, part.labels)
    order = np.lexsort((part.rows, -score, part.labels))
    firsts = np.r_[0, np.flatnonzero(np.diff(part.labels[order])) + 1]
    rep = part.rows[order[firsts]]
    sims = _rowwise_dot(x, part.rows, x, rep[part.labels])
    return rep, np.clip(sims, -1.0, 1.0)


def _score_stats(scores: np.ndarray, part: Partition) -> list[dict[str, list[float]]]:
    """Per set: {level: [mean, max]} of the members' cumulative scores."""
    sizes = part.sizes().astype(np.float64)
    order = np.argsort(part.labels, kind="stable")
    firsts = np.r_[0, np.flatnonzero(np.diff(part.labels[order])) + 1]
    s = scores[part.rows[order]]
    means = [
        np.bincount(part.labels, weights=scores[part.rows, j], minlength=part.m) / sizes for j in range(len(LEVELS))
    ]
    maxes = [np.maximum.reduceat(s[:, j], firsts) for j in range(len(LEVELS))]
    return [
        {lv: [round(float(means[j][c]), 6), round(float(maxes[j][c]), 6)] for j, lv in enumerate(LEVELS)}
        for c in range(part.m)
    ]


def _ordered(rows: np.ndarray, labels: np.ndarray) -> Partition:
    """Relabel so that sets are numbered by size (desc), then by their first row."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse)
    first = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(first, inverse, rows)
    order = np.lexsort((first, -sizes))
    rank = np.empty(len(uniq), np.int64)
    rank[order] = np.arange(len(uniq))
    return Partition(rows=rows, labels=rank[inverse], m=len(uniq))


# -- the run -----------------------------------------------------------------------------------------------------------
@dataclass
class _State:
    max_id: int
    count: int
    deletion_epoch: int


def _state(store: Store) -> _State:
    return _State(store.max_image_id(), store.count_images(), store.deletion_epoch())


def latest_clustering(store: Store) -> dict[str, Any] | None:
    cur = store.db.execute("SELECT * FROM clusterings ORDER BY id DESC LIMIT 1")
    row = cur.fetchone()
    if row is None:
        return None
    out = dict(zip([c[0] for c in cur.description], row, strict=True))
    out["params"] = json.loads(out["params"])
    out["timings"] = json.loads(out["timings"])
    return out


def _is_fresh(store: Store, last: dict[str, Any]) -> bool:
    s = _state(store)
    return (s.max_id, s.count, s.deletion_epoch) == (last["watermark"], last["images"], last["deletion_epoch"])


def _why(store: Store, last: dict[str, Any] | None, state: _State, threshold: float, k: int, force: bool) -> str | None:
    if last is None:
        return f"first clustering of this store ({state.count} images)"
    reasons = []
    if force:
        reasons.append("forced")
    if state.deletion_epoch != last["deletion_epoch"]:
        reasons.append("images were removed since the last clustering")
    elif state.max_id != last["watermark"] or state.count != last["images"]:
        added = state.count - store.count_images(int(last["watermark"]))
        reasons.append(
            f"the store grew by {added} images since the last clustering ({last['images']} -> {state.count})"
        )
    if float(threshold) != float(last["threshold"]):
        reasons.append(f"threshold changed ({last['threshold']} -> {threshold})")
    if k != last["k"]:
        reasons.append(f"K changed ({last['k']} -> {k})")
    if not reasons:
        return None
    return "; ".join(reasons) + f": recomputing groups and clusters over all {state.count} images"


def run_clustering(
    store_dir: str | Path,
    settings: Settings,
    *,
    threshold: float | None = None,
    n_clusters: int | None = None,
    force: bool = False,
    log: Log | None = None,
    method: str = "auto",
) -> dict[str, Any]:
    """Compute and store near-duplicate groups and k-means clusters under the writer lock (StoreLocked if busy).

    Returns groups, clusters, threshold, flagged_groups, flagged_clusters, images, recomputed, reason (and more)."""
    say = log or (lambda _msg: None)
    t = float(settings.near_duplicate_threshold if threshold is None else threshold)
    _as_threshold(t)
    if n_clusters is not None and int(n_clusters) < 1:
        raise InvalidArgument(f"the number of clusters must be at least 1, not {n_clusters}")
    with Store(store_dir) as store, store.writer_lock("nsfw-index cluster"):
        state = _state(store)
        if state.count == 0 or store.model_identity() is None:
            raise InvalidArgument(f"nothing to cluster: the store at {store.root} has no images; index some first")
        k = default_k(state.count) if n_clusters is None else min(int(n_clusters), state.count)
        if n_clusters is not None and k < int(n_clusters):
            say(f"only {state.count} images: K lowered from {n_clusters} to {k}")
        last = latest_clustering(store)
        reason = _why(store, last, state, t, k, force)
        if reason is None:
            say("clusters are up to date (no images added or removed, same threshold and K); --force recomputes")
            return {**_summary(store, settings, latest_clustering(store)), "recomputed": False, "reason": "up to date"}
        say(reason)
        run_id = store.begin_run("cluster", {"threshold": t, "k": k, "k_requested": n_clusters, "force": force})
        status = "failed"
        try:
            out = _compute_and_store(store, settings, state, t, k, n_clusters, run_id, say, method)
            status = "done"
        finally:
            store.finish_run(
                run_id,
                status,
                {}
                if status != "done"
                else {"groups": out["groups"], "clusters": out["clusters"], "images": out["images"]},
                {},
            )
        return {**out, "recomputed": True, "reason": reason}


def _compute_and_store(
    store: Store,
    settings: Settings,
    state: _State,
    t: float,
    k: int,
    k_requested: int | None,
    run_id: int,
    say: Log,
    method: str,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ids, x = load_vectors(store, state.max_id)
    n = len(ids)
    cols = ", ".join(f"s_{lv}" for lv in LEVELS)
    score_rows = store.db.execute(f"SELECT {cols} FROM images WHERE id <= ? ORDER BY id", [state.max_id]).fetchall()
    scores = np.asarray(score_rows, dtype=np.float64).reshape(-1, len(LEVELS))
    if len(scores) != n:  # we hold the writer lock, so only a damaged database gets here
        raise StoreCorrupt(f"{store.db_path}: {n} embeddings but {len(scores)} score rows up to id {state.max_id}")
    path_count = np.zeros(n, np.int64)
    pc = store.db.execute(
        "SELECT image_id, COUNT(*) FROM paths WHERE image_id <= ? GROUP BY image_id", [state.max_id]
    ).fetchall()
    if pc:
        pc_arr = np.asarray(pc, dtype=np.int64)
        pos = np.searchsorted(ids, pc_arr[:, 0])
        ok = (pos < n) & (ids[np.minimum(pos, n - 1)] == pc_arr[:, 0])
        path_count[pos[ok]] = pc_arr[ok, 1]
    timings["load_s"] = time.perf_counter() - t0
    say(f"loaded {n} vectors ({x.shape[1]}-d) in {timings['load_s']:.1f}s")

    # near-duplicate groups
    t0 = time.perf_counter()
    how = graph_method(n, method)
    ncomp, comp, edges = component_labels(x, t, method=how)
    sizes = np.bincount(comp, minlength=ncomp)
    paths_per = np.bincount(comp, weights=path_count, minlength=ncomp)
    is_group = (sizes >= 2) | (paths_per >= 2)
    rows_g = np.flatnonzero(is_group[comp])
    groups = _ordered(rows_g, comp[rows_g]) if len(rows_g) else Partition(rows_g, rows_g, 0)
    timings["groups_s"] = time.perf_counter() - t0
    how_text = (
        "exact range search"
        if how == "exact"
        else f"approximate: range search within IVF cells, nlist={ivf_nlist(n)}, nprobe={IVF_NPROBE}"
    )
    say(f"near-duplicate graph ({how_text}): {edges} pairs >= {t}, {groups.m} groups in {timings['groups_s']:.1f}s")

    # k-means clusters
    t0 = time.perf_counter()
    km = kmeans_labels(x, k)
    clusters = _ordered(np.arange(n, dtype=np.int64), km)
    timings["kmeans_s"] = time.perf_counter() - t0
    say(f"k-means: K={k}, {clusters.m} non-empty clusters in {timings['kmeans_s']:.1f}s")

    t0 = time.perf_counter()
    results = []
    for kind, part in (("group", groups), ("cluster", clusters)):
        if part.m == 0:
            continue
        rep, sims = representatives(x, part)
        cohesion = np.bincount(part.labels, weights=sims, minlength=part.m) / part.sizes()
        stats = _score_stats(scores, part)
        paths = np.bincount(part.labels, weights=path_count[part.rows], minlength=part.m)
        results.append((kind, part, rep, sims, cohesion, stats, paths))
    timings["representatives_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    params = {
        "method": how,
        "tile": TILE,
        "nprobe": IVF_NPROBE,
        "nlist": ivf_nlist(n) if how == "ivf" else None,
        "kmeans_niter": KMEANS_NITER,
        "kmeans_seed": KMEANS_SEED,
        "spherical": True,
        "edges": int(edges),
    }
    with store.transaction() as conn:
        conn.execute("DELETE FROM cluster_members")
        conn.execute("DELETE FROM clusters")
        cur = conn.execute(
            "INSERT INTO clusterings (created_at, run_id, threshold, k, k_requested, watermark, images, deletion_epoch,"
            " method, params, timings, groups, grouped_images, clusters) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                utcnow(),
                run_id,
                t,
                k,
                k_requested,
                state.max_id,
                n,
                state.deletion_epoch,
                how,
                json.dumps(params),
                json.dumps({}),
                groups.m,
                len(groups.rows),
                clusters.m,
            ],
        )
        clustering_id = int(cur.lastrowid or 0)
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'clusters'").fetchone()
        base = int(seq[0]) if seq else 0
        for kind, part, rep, sims, cohesion, stats, paths in results:
            sizes_k = part.sizes()
            conn.executemany(
                "INSERT INTO clusters (id, clustering_id, kind, size, path_count, representative_id, cohesion, "
                "score_stats) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        base + 1 + c,
                        clustering_id,
                        kind,
                        int(sizes_k[c]),
                        int(paths[c]),
                        int(ids[rep[c]]),
                        round(float(cohesion[c]), 6),
                        json.dumps(stats[c]),
                    )
                    for c in range(part.m)
                ],
            )
            conn.executemany(
                "INSERT INTO cluster_members (cluster_id, image_id, similarity) VALUES (?,?,?)",
                zip(
                    (part.labels + base + 1).tolist(), ids[part.rows].tolist(), np.round(sims, 6).tolist(), strict=True
                ),
            )
            base += part.m
        timings["write_s"] = time.perf_counter() - t0
        conn.execute(
            "UPDATE clusterings SET timings = ? WHERE id = ?",
            [json.dumps({k_: round(v, 3) for k_, v in timings.items()}), clustering_id],
        )
    say(f"stored {groups.m} groups and {clusters.m} clusters in {timings['write_s']:.1f}s")
    return _summary(store, settings, latest_clustering(store))


@contextlib.contextmanager
def _read_snapshot(store: Store) -> Iterator[None]:
    """One read transaction, so that a clustering committed meanwhile is seen whole or not at all."""
    conn = store.db.conn
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


# -- reading -----------------------------------------------------------------------------------------------------------
def _unsafe_counts(
    store: Store, settings: Settings, kind: str | None = None, unsafe: dict[int, list[str]] | None = None
) -> dict[int, int]:
    """cluster id -> number of known-unsafe members, as of now (labels, hash lists, model scores)."""
    unsafe = store.known_unsafe(settings) if unsafe is None else unsafe
    if not unsafe:
        return {}
    q = (
        "SELECT m.cluster_id, COUNT(*) FROM cluster_members m JOIN clusters c ON c.id = m.cluster_id "
        "WHERE m.image_id IN (SELECT value FROM json_each(?))"
        + (" AND c.kind = ?" if kind else "")
        + " GROUP BY m.cluster_id"
    )
    args: list[Any] = [json.dumps(sorted(unsafe))] + ([kind] if kind else [])
    return {int(c): int(n) for c, n in store.db.execute(q, args)}


def _summary(store: Store, settings: Settings, last: dict[str, Any] | None) -> dict[str, Any]:
    if last is None:
        return {}
    counts = _unsafe_counts(store, settings)
    kinds = dict(store.db.execute("SELECT id, kind FROM clusters").fetchall()) if counts else {}
    flagged = {kind: sum(1 for c in counts if kinds.get(c) == kind) for kind in KINDS}
    largest = [
        int(r[0])
        for r in store.db.execute("SELECT size FROM clusters WHERE kind = 'group' ORDER BY size DESC, id LIMIT 5")
    ]
    return {
        "clustering_id": last["id"],
        "created_at": last["created_at"],
        "images": last["images"],
        "groups": last["groups"],
        "grouped_images": last["grouped_images"],
        "clusters": last["clusters"],
        "threshold": last["threshold"],
        "k": last["k"],
        "method": last["method"],
        "flagged_groups": flagged["group"],
        "flagged_clusters": flagged["cluster"],
        "largest_groups": largest,
        "fresh": _is_fresh(store, last),
        "timings": last["timings"],
    }


def cluster_summary(store: Store, settings: Settings | None = None) -> dict[str, Any] | None:
    """The latest clustering in a few numbers (None before any): flags as of now, `fresh` if the store is unchanged."""
    with _read_snapshot(store):
        last = latest_clustering(store)
        if last is None:
            return None
        return _summary(store, settings or Settings.from_flags(), last)


_ITEM_COLUMNS = "id, kind, size, path_count, representative_id, cohesion, score_stats"


def _item(row: Sequence[Any], counts: dict[int, int], settings: Settings) -> dict[str, Any]:
    cid, kind, size, path_count, rep, cohesion, stats_json = row
    stats = json.loads(stats_json)
    mean, mx = stats[settings.nsfw_level]
    unsafe = counts.get(int(cid), 0)
    return {
        "id": int(cid),
        "kind": kind,
        "size": int(size),
        "path_count": int(path_count),
        "mean_score": mean,
        "max_score": mx,
        "score_level": settings.nsfw_level,
        "unsafe_count": unsafe,
        "flagged": unsafe > 0,
        "representative_id": int(rep),
        "cohesion": cohesion,
    }


def list_clusters(
    store: Store, settings: Settings, *, kind: str = "cluster", sort: str = "size", page: int = 1, per_page: int = 50
) -> dict[str, Any]:
    """One page of groups or clusters, biggest (`size`) or most known-unsafe members (`unsafe`) first, ties by id."""
    with _read_snapshot(store):
        return _list_clusters(store, settings, kind=kind, sort=sort, page=page, per_page=per_page)


def _list_clusters(
    store: Store, settings: Settings, *, kind: str, sort: str, page: int, per_page: int
) -> dict[str, Any]:
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {list(KINDS)}, not {kind!r}")
    if sort not in SORTS:
        raise InvalidArgument(f"sort must be one of {list(SORTS)}, not {sort!r}")
    if not isinstance(page, int) or page < 1:
        raise InvalidArgument(f"page starts at 1, not {page!r}")
    if not isinstance(per_page, int) or not 1 <= per_page <= MAX_PER_PAGE:
        raise InvalidArgument(f"per_page must be between 1 and {MAX_PER_PAGE}, not {per_page!r}")
    last = latest_clustering(store)
    empty = {"items": [], "total": 0, "page": page, "per_page": per_page, "fresh": False, "clustering": None}
    if last is None:
        return empty
    counts = _unsafe_counts(store, settings, kind)
    total = int(store.db.execute("SELECT COUNT(*) FROM clusters WHERE kind = ?", [kind]).fetchone()[0])
    offset = (page - 1) * per_page
    if sort == "size":
        rows = store.db.execute(
            f"SELECT {_ITEM_COLUMNS} FROM clusters WHERE kind = ? ORDER BY size DESC, id LIMIT ? OFFSET ?",
            [kind, per_page, offset],
        ).fetchall()
    else:
        order = sorted(
            (-counts.get(int(cid), 0), int(cid))
            for (cid,) in store.db.execute("SELECT id FROM clusters WHERE kind = ?", [kind])
        )
        wanted = [cid for _, cid in order[offset : offset + per_page]]
        by_id = {
            int(r[0]): r
            for r in store.db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM clusters WHERE id IN (SELECT value FROM json_each(?))",
                [json.dumps(wanted)],
            )
        }
        rows = [by_id[c] for c in wanted]
    return {
        "items": [_item(r, counts, settings) for r in rows],
        "total": total,
        "page": page,
        "per_page": per_page,
        "fresh": _is_fresh(store, last),
        "clustering": {
            "id": last["id"],
            "created_at": last["created_at"],
            "threshold": last["threshold"],
            "k": last["k"],
        },
    }


def get_cluster(store: Store, settings: Settings, cluster_id: int, *, limit: int | None = None) -> dict[str, Any]:
    """One group or cluster with its members (most similar to the representative first; at most `limit`)."""
    with _read_snapshot(store):
        return _get_cluster(store, settings, cluster_id, limit)


def _get_cluster(store: Store, settings: Settings, cluster_id: int, limit: int | None) -> dict[str, Any]:
    row = store.db.execute(f"SELECT {_ITEM_COLUMNS} FROM clusters WHERE id = ?", [int(cluster_id)]).fetchone()
    if row is None:
        raise NotFound(
            f"no cluster or group with id {cluster_id} in the latest clustering of {store.root}; "
            "list them with GET /v1/clusters (ids change when `nsfw-index cluster` recomputes)"
        )
    if limit is not None and limit < 0:
        raise InvalidArgument(f"limit must be >= 0, not {limit}")
    members = store.db.execute(
        "SELECT image_id, similarity FROM cluster_members WHERE cluster_id = ? ORDER BY similarity DESC, image_id",
        [int(cluster_id)],
    ).fetchall()
    ids = [int(m[0]) for m in members]
    rows = store.images(ids)
    sources: dict[int, list[str]] = {}
    for i in range(0, len(ids), 500):
        sources.update(store.sources_of(ids[i : i + 500], settings))
    path_counts: dict[int, int] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        path_counts.update(
            {
                int(a): int(b)
                for a, b in store.db.execute(
                    f"SELECT image_id, COUNT(*) FROM paths WHERE image_id IN ({','.join('?' * len(chunk))}) "
                    "GROUP BY image_id",
                    chunk,
                )
            }
        )
    present = [(i, s) for i, s in members if int(i) in rows]
    counts = {int(row[0]): sum(1 for i, _ in present if sources.get(int(i)))}
    item = _item(row, counts, settings)
    shown = present if limit is None else present[:limit]
    item["members_total"] = len(present)
    item["members"] = [
        {
            "id": int(i),
            "similarity": float(s),
            "scores": rows[int(i)]["scores"],
            "level": rows[int(i)]["level"],
            "sources": sources.get(int(i), []),
            "path_count": path_counts.get(int(i), 0),
        }
        for i, s in shown
    ]
    return item


def memberships(store: Store, kind: str = "cluster") -> dict[int, int]:
    """image id -> id of its group or cluster in the latest clustering (images in no group are left out)."""
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {list(KINDS)}, not {kind!r}")
    return {
        int(i): int(c)
        for i, c in store.db.execute(
            "SELECT m.image_id, m.cluster_id FROM cluster_members m JOIN clusters c ON c.id = m.cluster_id "
            "WHERE c.kind = ?",
            [kind],
        )
    }
