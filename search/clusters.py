"""Near-duplicate groups and k-means clusters of a store: computed and stored by `run_clustering`, read with flags that
follow the current labels. The maths is in `search.graph`; the SQL in `search.store.clusters`.

Exact duplicates (one content at several paths) are one image row already, so group members are image ids, and every
group records how many stored paths (copies) it covers. A component of one image is a group only when that image has
two or more paths (exact duplicates); other singletons are not stored.

Flags follow labels: unsafe counts are computed when results are READ, from `Store.known_unsafe(settings)`, so labelling
an image after clustering flags its group and cluster at once (and `safe` unflags). Score means and maxima are stored
per level (an image's scores never change).

Incremental behaviour: a run on a store whose max image id, image count and deletion epoch match the last clustering,
with the same threshold and K, returns "up to date" without work. Anything else recomputes everything and says why:
k-means centroids move when images arrive, so results are recomputed, not patched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from search.answers import ClusterDetail, ClusteringRef, ClusteringSummary, ClusterMember, ClusterPage, ClusterSummary
from search.errors import InvalidArgument, NotFound, StoreCorrupt, StoreLocked
from search.graph import (
    IVF_NPROBE,
    KMEANS_NITER,
    KMEANS_SEED,
    TILE,
    Partition,
    check_threshold,
    default_k,
    describe,
    graph_method,
    ivf_nlist,
    kmeans_labels,
    near_duplicate_groups,
)
from search.settings import LEVELS, Settings
from search.store import Store
from search.store.clusters import ClusteringRecord, ClusterRow, ClusterSet

KINDS = ("group", "cluster")
SORTS = ("size", "unsafe")
MAX_PER_PAGE = 1000

Log = Callable[[str], None]


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


def path_counts(store: Store, ids: np.ndarray, upto_id: int) -> np.ndarray:
    """Stored paths per image, aligned with `ids` (sorted, as `load_vectors` gives them)."""
    n = len(ids)
    out = np.zeros(n, np.int64)
    pc = store.path_counts_upto(upto_id)
    if len(pc) and n:
        pos = np.searchsorted(ids, pc[:, 0])
        ok = (pos < n) & (ids[np.minimum(pos, n - 1)] == pc[:, 0])
        out[pos[ok]] = pc[ok, 1]
    return out


# -- the run -----------------------------------------------------------------------------------------------------------
@dataclass
class _State:
    max_id: int
    count: int
    deletion_epoch: int


def _state(store: Store) -> _State:
    return _State(store.max_image_id(), store.count_images(), store.deletion_epoch())


def _is_fresh(store: Store, last: ClusteringRecord) -> bool:
    s = _state(store)
    return (s.max_id, s.count, s.deletion_epoch) == (last.watermark, last.images, last.deletion_epoch)


def _why(
    store: Store, last: ClusteringRecord | None, state: _State, threshold: float, k: int, force: bool
) -> str | None:
    if last is None:
        return f"first clustering of this store ({state.count} images)"
    reasons = []
    if force:
        reasons.append("forced")
    if state.deletion_epoch != last.deletion_epoch:
        reasons.append("images were removed since the last clustering")
    elif state.max_id != last.watermark or state.count != last.images:
        added = state.count - store.count_images(int(last.watermark))
        reasons.append(f"the store grew by {added} images since the last clustering ({last.images} -> {state.count})")
    if float(threshold) != float(last.threshold):
        reasons.append(f"threshold changed ({last.threshold} -> {threshold})")
    if k != last.k:
        reasons.append(f"K changed ({last.k} -> {k})")
    if not reasons:
        return None
    return "; ".join(reasons) + f": recomputing groups and clusters over all {state.count} images"


def run_clustering(
    store: Store,
    settings: Settings,
    *,
    threshold: float | None = None,
    n_clusters: int | None = None,
    force: bool = False,
    log: Log | None = None,
    method: str = "auto",
) -> ClusteringSummary:
    """Compute and store near-duplicate groups and k-means clusters. The caller holds the writer lock: open the store
    with `Store.writing(store_dir, "nsfw-index cluster")`.

    Returns the clustering's summary with `recomputed` and `reason` ("up to date" when nothing changed)."""
    say = log or (lambda _msg: None)
    t = float(settings.near_duplicate_threshold if threshold is None else threshold)
    check_threshold(t)
    if n_clusters is not None and int(n_clusters) < 1:
        raise InvalidArgument(f"the number of clusters must be at least 1, not {n_clusters}")
    if not store.holds_writer_lock:
        raise StoreLocked(
            f"clustering writes to the store at {store.root} and needs its writer lock: open it with "
            f'Store.writing(store_dir, "nsfw-index cluster")'
        )
    state = _state(store)
    if state.count == 0 or store.model_identity() is None:
        raise InvalidArgument(f"nothing to cluster: the store at {store.root} has no images; index some first")
    k = default_k(state.count) if n_clusters is None else min(int(n_clusters), state.count)
    if n_clusters is not None and k < int(n_clusters):
        say(f"only {state.count} images: K lowered from {n_clusters} to {k}")
    last = store.latest_clustering()
    reason = _why(store, last, state, t, k, force)
    if reason is None:
        say("clusters are up to date (no images added or removed, same threshold and K); --force recomputes")
        return _summary(store, settings, last, recomputed=False, reason="up to date")
    say(reason)
    run_id = store.begin_run("cluster", {"threshold": t, "k": k, "k_requested": n_clusters, "force": force})
    status = "failed"
    counts: dict[str, int] = {}
    try:
        _compute_and_store(store, state, t, k, n_clusters, run_id, say, method)
        out = _summary(store, settings, store.latest_clustering(), recomputed=True, reason=reason)
        counts = {"groups": out.groups, "clusters": out.clusters, "images": out.images}
        status = "done"
    finally:
        store.finish_run(run_id, status, counts if status == "done" else {}, {})
    return out


def _compute_and_store(
    store: Store, state: _State, t: float, k: int, k_requested: int | None, run_id: int, say: Log, method: str
) -> None:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ids, x = load_vectors(store, state.max_id)
    n = len(ids)
    scores = store.score_matrix(state.max_id)
    if len(scores) != n:  # we hold the writer lock, so only a damaged database gets here
        raise StoreCorrupt(f"{store.db_path}: {n} embeddings but {len(scores)} score rows up to id {state.max_id}")
    paths = path_counts(store, ids, state.max_id)
    timings["load_s"] = time.perf_counter() - t0
    say(f"loaded {n} vectors ({x.shape[1]}-d) in {timings['load_s']:.1f}s")

    t0 = time.perf_counter()
    how = graph_method(n, method)
    groups, edges = near_duplicate_groups(x, t, path_count=paths, method=how)
    timings["groups_s"] = time.perf_counter() - t0
    how_text = (
        "exact range search"
        if how == "exact"
        else f"approximate: range search within IVF cells, nlist={ivf_nlist(n)}, nprobe={IVF_NPROBE}"
    )
    say(f"near-duplicate graph ({how_text}): {edges} pairs >= {t}, {groups.m} groups in {timings['groups_s']:.1f}s")

    t0 = time.perf_counter()
    clusters = Partition.ordered(np.arange(n, dtype=np.int64), kmeans_labels(x, k))
    timings["kmeans_s"] = time.perf_counter() - t0
    say(f"k-means: K={k}, {clusters.m} non-empty clusters in {timings['kmeans_s']:.1f}s")

    t0 = time.perf_counter()
    sets = []
    for kind, part in (("group", groups), ("cluster", clusters)):
        if part.m == 0:
            continue
        d = describe(x, part, scores, paths, LEVELS)
        sets.append(
            ClusterSet(
                kind=kind,
                sizes=part.sizes(),
                path_counts=d.paths,
                representative_ids=ids[d.representatives],
                cohesion=d.cohesion,
                score_stats=d.score_stats,
                member_set=part.labels,
                member_ids=ids[part.rows],
                member_similarity=d.similarities,
            )
        )
    timings["representatives_s"] = time.perf_counter() - t0

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
    store.replace_clustering(
        run_id=run_id,
        threshold=t,
        k=k,
        k_requested=k_requested,
        watermark=state.max_id,
        images=n,
        deletion_epoch=state.deletion_epoch,
        method=how,
        params=params,
        sets=sets,
        timings=timings,
    )
    last = store.latest_clustering()
    write_s = last.timings.get("write_s", 0.0) if last else 0.0
    say(f"stored {groups.m} groups and {clusters.m} clusters in {write_s:.1f}s")


# -- reading -----------------------------------------------------------------------------------------------------------
def _unsafe_counts(store: Store, settings: Settings, kind: str | None = None) -> dict[int, int]:
    """cluster id -> number of known-unsafe members, as of now (labels, hash lists, model scores)."""
    return store.unsafe_counts(list(store.known_unsafe(settings)), kind)


def _summary(
    store: Store,
    settings: Settings,
    last: ClusteringRecord | None,
    *,
    recomputed: bool | None = None,
    reason: str | None = None,
) -> ClusteringSummary:
    if last is None:  # only a store changed underneath us: we hold the lock while writing, and read a snapshot
        raise StoreCorrupt(f"{store.db_path}: no clustering recorded")
    counts = _unsafe_counts(store, settings)
    kinds = store.cluster_kinds() if counts else {}
    flagged = {kind: sum(1 for c in counts if kinds.get(c) == kind) for kind in KINDS}
    return ClusteringSummary(
        clustering_id=last.id,
        created_at=last.created_at,
        images=last.images,
        groups=last.groups,
        grouped_images=last.grouped_images,
        clusters=last.clusters,
        threshold=last.threshold,
        k=last.k,
        method=last.method,
        flagged_groups=flagged["group"],
        flagged_clusters=flagged["cluster"],
        largest_groups=store.largest_groups(5),
        fresh=_is_fresh(store, last),
        timings=last.timings,
        recomputed=recomputed,
        reason=reason,
    )


def cluster_summary(store: Store, settings: Settings | None = None) -> ClusteringSummary | None:
    """The latest clustering in a few numbers (None before any): flags as of now, `fresh` if the store is unchanged."""
    with store.read_snapshot():
        last = store.latest_clustering()
        if last is None:
            return None
        return _summary(store, settings or Settings.from_flags(), last)


def _item(row: ClusterRow, counts: dict[int, int], settings: Settings) -> ClusterSummary:
    mean, mx = row.score_stats[settings.nsfw_level]
    unsafe = counts.get(row.id, 0)
    return ClusterSummary(
        id=row.id,
        kind=row.kind,
        size=row.size,
        path_count=row.path_count,
        mean_score=mean,
        max_score=mx,
        score_level=settings.nsfw_level,
        unsafe_count=unsafe,
        flagged=unsafe > 0,
        representative_id=row.representative_id,
        cohesion=row.cohesion,
    )


def _check_page(kind: str, sort: str, page: int, per_page: int) -> None:
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {list(KINDS)}, not {kind!r}")
    if sort not in SORTS:
        raise InvalidArgument(f"sort must be one of {list(SORTS)}, not {sort!r}")
    if not isinstance(page, int) or page < 1:
        raise InvalidArgument(f"page starts at 1, not {page!r}")
    if not isinstance(per_page, int) or not 1 <= per_page <= MAX_PER_PAGE:
        raise InvalidArgument(f"per_page must be between 1 and {MAX_PER_PAGE}, not {per_page!r}")


def list_clusters(
    store: Store, settings: Settings, *, kind: str = "cluster", sort: str = "size", page: int = 1, per_page: int = 50
) -> ClusterPage:
    """One page of groups or clusters, biggest (`size`) or most known-unsafe members (`unsafe`) first, ties by id."""
    _check_page(kind, sort, page, per_page)
    with store.read_snapshot():
        last = store.latest_clustering()
        if last is None:
            return ClusterPage(items=[], total=0, page=page, per_page=per_page, fresh=False, clustering=None)
        counts = _unsafe_counts(store, settings, kind)
        offset = (page - 1) * per_page
        if sort == "size":
            rows = store.clusters_by_size(kind, limit=per_page, offset=offset)
        else:
            order = sorted((-counts.get(cid, 0), cid) for cid in store.cluster_ids(kind))
            rows = store.cluster_rows([cid for _, cid in order[offset : offset + per_page]])
        return ClusterPage(
            items=[_item(r, counts, settings) for r in rows],
            total=store.cluster_count(kind),
            page=page,
            per_page=per_page,
            fresh=_is_fresh(store, last),
            clustering=ClusteringRef(id=last.id, created_at=last.created_at, threshold=last.threshold, k=last.k),
        )


def get_cluster(store: Store, settings: Settings, cluster_id: int, *, limit: int | None = None) -> ClusterDetail:
    """One group or cluster with its members (most similar to the representative first; at most `limit`)."""
    with store.read_snapshot():
        row = store.cluster_row(cluster_id)
        if row is None:
            raise NotFound(
                f"no cluster or group with id {cluster_id} in the latest clustering of {store.root}; "
                "list them with GET /v1/clusters (ids change when `nsfw-index cluster` recomputes)"
            )
        if limit is not None and limit < 0:
            raise InvalidArgument(f"limit must be >= 0, not {limit}")
        members = store.cluster_members(row.id)
        ids = [i for i, _ in members]
        rows = store.images(ids)
        sources = store.known_unsafe(settings, ids=ids)
        paths = store.member_path_counts(ids)
    present = [(i, s) for i, s in members if i in rows]  # a prune may have removed members since the run
    item = _item(row, {row.id: sum(1 for i, _ in present if sources.get(i))}, settings)
    shown = present if limit is None else present[:limit]
    return ClusterDetail(
        **dict(item),
        members_total=len(present),
        members=[
            ClusterMember(
                id=i,
                similarity=s,
                scores=rows[i].scores,
                level=rows[i].level,
                sources=sources.get(i, []),
                path_count=paths.get(i, 0),
            )
            for i, s in shown
        ],
    )


def memberships(store: Store, kind: str = "cluster") -> dict[int, int]:
    """image id -> id of its group or cluster in the latest clustering (images in no group are left out)."""
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {list(KINDS)}, not {kind!r}")
    return store.cluster_memberships(kind)
