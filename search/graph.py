"""The clustering maths on vectors alone (numpy, faiss, scipy; no Store, no SQL): near-duplicate edges, components,
k-means, medoid representatives and per-set statistics, usable from a notebook.

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

Semantic clusters: spherical `faiss.Kmeans` (seed KMEANS_SEED, KMEANS_NITER iterations, at most 256 training points
per centroid), every image assigned to its nearest centroid, so the assignments cover every image exactly once. Default
K = clamp(round(sqrt(N/2)), 1, MAX_K) and K <= N; empty clusters are dropped.

Representative of a group or cluster: the medoid under squared Euclidean distance on the unit sphere, i.e. the member
with the highest mean cosine similarity to all members. Since sum_j x_i·x_j = x_i·(sum_j x_j) this is exact in O(n·d)
for any size (it is the member nearest to the members' mean direction); ties go to the lowest row. Each member has its
similarity to the representative; `cohesion` is the mean of those.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from search.errors import InvalidArgument

EXACT_MAX_IMAGES = 200_000  # above this the near-duplicate graph comes from the approximate (IVF cell) search
TILE = 4096  # rows per exact range-search tile (bounds the memory of one tile's results)
IVF_NPROBE = 4  # cells each image is listed in, in the approximate graph
IVF_POINTS_PER_LIST = 64  # training sample for the IVF quantizer
KMEANS_NITER = 20
KMEANS_SEED = 1234
MAX_K = 4096
FOREST_FLUSH_EDGES = 4_000_000  # fold pending edges into the spanning forest past this many

#: One block of edges: (rows, cols, sims), int64, int64, float32.
Edges = tuple[np.ndarray, np.ndarray, np.ndarray]


def default_k(n: int) -> int:
    """K = clamp(round(sqrt(N/2)), 1, 4096), and never more than N."""
    if n <= 0:
        return 0
    return int(min(n, max(1, min(MAX_K, round(math.sqrt(n / 2))))))


def ivf_nlist(n: int) -> int:
    """Inverted lists for the approximate graph: 2·sqrt(N), at least 1 and at most N/8."""
    return int(max(1, min(round(2 * math.sqrt(n)), n // 8 or 1)))


def check_threshold(threshold: float) -> np.float32:
    """The threshold as FAISS compares it (float32), or InvalidArgument when it is no cosine similarity."""
    t = float(threshold)
    if not -1.0 <= t <= 1.0 or math.isnan(t):
        raise InvalidArgument(f"the near-duplicate threshold is a cosine similarity in [-1, 1], not {threshold!r}")
    return np.float32(t)


def graph_method(n: int, method: str = "auto") -> str:
    """`exact` or `ivf` for N images (`auto`: exact up to EXACT_MAX_IMAGES)."""
    if method == "auto":
        return "exact" if n <= EXACT_MAX_IMAGES else "ivf"
    if method not in ("exact", "ivf"):
        raise InvalidArgument(f"method must be auto, exact or ivf, not {method!r}")
    return method


# -- the near-duplicate graph ------------------------------------------------------------------------------------------
def exact_edges(x: np.ndarray, threshold: float, tile: int | None = None) -> Iterator[Edges]:
    """(rows, cols, sims) with rows < cols and sims >= threshold, tile by tile, every pair scored once."""
    n, d = x.shape
    tile = TILE if tile is None else int(tile)
    t32 = check_threshold(threshold)
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


def ivf_edges(
    x: np.ndarray, threshold: float, *, nprobe: int = IVF_NPROBE, tile: int | None = None, seed: int = 0
) -> Iterator[Edges]:
    """(rows, cols, sims) with sims >= threshold, scored only within IVF cells (approximate, BLAS throughout).

    An inverted-file partition: spherical k-means (FAISS) into nlist = 2·sqrt(N) cells, trained on IVF_POINTS_PER_LIST
    points per cell, and every vector listed in its `nprobe` nearest cells. The images whose nearest cell is c are then
    range-searched against an IndexFlatIP of every image listed in c. A pair is scored when one image's nearest cell
    is among the other's `nprobe` nearest: near-duplicates, far closer to each other than to anything else, nearly
    always are. Unlike one kNN search per image (memory-bound: every query streams its probed lists), each cell is one
    matrix product, and there is no cap on neighbours, so a large family is found whole."""
    n, d = x.shape
    tile = TILE if tile is None else int(tile)
    t32 = check_threshold(threshold)
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


def similarity_edges(x: np.ndarray, threshold: float, *, method: str = "auto") -> Iterator[Edges]:
    """Blocks of (rows, cols, sims): the pairs of rows of `x` with cosine similarity >= threshold."""
    if graph_method(len(x), method) == "exact":
        return exact_edges(x, threshold)
    return ivf_edges(x, threshold)


class Forest:
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
            if self.pending >= FOREST_FLUSH_EDGES:
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
    forest = Forest(len(x))
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
        keep = sims >= check_threshold(t)
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


# -- sets of rows: representatives and statistics ----------------------------------------------------------------------
@dataclass
class Partition:
    """Sets of rows of X: `rows[i]` belongs to set `labels[i]` (0..m-1, every set non-empty)."""

    rows: np.ndarray
    labels: np.ndarray
    m: int

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.m)

    @classmethod
    def ordered(cls, rows: np.ndarray, labels: np.ndarray) -> Partition:
        """The sets of `rows` by `labels`, numbered by size (desc), then by their first row."""
        if not len(rows):
            return cls(rows, rows, 0)
        uniq, inverse = np.unique(labels, return_inverse=True)
        sizes = np.bincount(inverse)
        first = np.full(len(uniq), np.iinfo(np.int64).max)
        np.minimum.at(first, inverse, rows)
        order = np.lexsort((first, -sizes))
        rank = np.empty(len(uniq), np.int64)
        rank[order] = np.arange(len(uniq))
        return cls(rows=rows, labels=rank[inverse], m=len(uniq))


def near_duplicate_groups(
    x: np.ndarray, threshold: float, *, path_count: np.ndarray | None = None, method: str = "auto"
) -> tuple[Partition, int]:
    """(groups, edges seen): the components of the near-duplicate graph with two or more images, and (given the
    stored paths per row, `path_count`) the single images held at two or more paths (exact duplicates)."""
    ncomp, comp, edges = component_labels(x, threshold, method=method)
    sizes = np.bincount(comp, minlength=ncomp)
    is_group = sizes >= 2
    if path_count is not None:
        is_group |= np.bincount(comp, weights=path_count, minlength=ncomp) >= 2
    rows = np.flatnonzero(is_group[comp])
    return Partition.ordered(rows, comp[rows]), edges


def _rowwise_dot(
    a: np.ndarray, rows_a: np.ndarray, b: np.ndarray, rows_b: np.ndarray, chunk: int = 32768
) -> np.ndarray:
    out = np.empty(len(rows_a), np.float32)
    for i in range(0, len(rows_a), chunk):
        out[i : i + chunk] = np.einsum("ij,ij->i", a[rows_a[i : i + chunk]], b[rows_b[i : i + chunk]])
    return out


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


def score_stats(scores: np.ndarray, part: Partition, levels: Sequence[str]) -> list[dict[str, list[float]]]:
    """Per set: {level: [mean, max]} of the members' scores (`scores`: one row per row of X, a column per level)."""
    sizes = part.sizes().astype(np.float64)
    order = np.argsort(part.labels, kind="stable")
    firsts = np.r_[0, np.flatnonzero(np.diff(part.labels[order])) + 1]
    s = scores[part.rows[order]]
    means = [
        np.bincount(part.labels, weights=scores[part.rows, j], minlength=part.m) / sizes for j in range(len(levels))
    ]
    maxes = [np.maximum.reduceat(s[:, j], firsts) for j in range(len(levels))]
    return [
        {lv: [round(float(means[j][c]), 6), round(float(maxes[j][c]), 6)] for j, lv in enumerate(levels)}
        for c in range(part.m)
    ]


@dataclass
class SetSummary:
    """One partition described: the representative row per set, each member's similarity to it, the mean of those
    (`cohesion`) per set, the score stats per set and the stored paths per set."""

    part: Partition
    representatives: np.ndarray
    similarities: np.ndarray
    cohesion: np.ndarray
    score_stats: list[dict[str, list[float]]]
    paths: np.ndarray


def describe(
    x: np.ndarray, part: Partition, scores: np.ndarray, path_count: np.ndarray, levels: Sequence[str]
) -> SetSummary:
    """Representatives, similarities, cohesion, score stats and path counts of the sets of `part`."""
    rep, sims = representatives(x, part)
    return SetSummary(
        part=part,
        representatives=rep,
        similarities=sims,
        cohesion=np.bincount(part.labels, weights=sims, minlength=part.m) / part.sizes(),
        score_stats=score_stats(scores, part, levels),
        paths=np.bincount(part.labels, weights=path_count[part.rows], minlength=part.m),
    )
