"""`stats`: counts, levels, known-unsafe, index freshness, recall of an approximate index, model identity."""

from __future__ import annotations

from search.answers import Stats
from search.ondisk import exact_knn, sample_vectors
from search.query import DEFAULT_NEAR_DUPLICATE_LIMIT
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, set_search_params

ANSWER_FETCH = DEFAULT_NEAR_DUPLICATE_LIMIT + 1  # what an indexed image's answer asks the index for


def recall_at_k(store: Store, files: IndexFiles, settings: Settings, sample: int, k: int = 10) -> float | None:
    """Recall@k of the stored approximate index against exact inner-product search, on a sample of stored vectors
    (each query finds itself in both). Memory stays bounded: the queries are sampled and the exact search streams the
    vectors from SQLite chunk by chunk (its time grows with the store: `--recall-sample 0` skips it)."""
    if sample <= 0:  # before loading: the index file can be large
        return None
    snap = files.load("all")
    if snap is None or snap.manifest.get("factory", "Flat") == "Flat" or snap.index.ntotal == 0:
        return None
    set_search_params(snap.index, settings)
    watermark = int(snap.manifest.get("watermark", 0))
    q = sample_vectors(store, watermark, sample, seed=0)
    kk = min(k, int(snap.index.ntotal))
    _, truth = exact_knn(store, q, kk, watermark)
    fetch = min(ANSWER_FETCH, int(snap.index.ntotal))  # as answers ask: their top 100 (+ the image), cut to k
    got = [snap.search(q[i : i + 1], fetch)[1][0][:kk] for i in range(len(q))]
    hits = sum(len(set(t[t >= 0].tolist()) & set(g.tolist())) for t, g in zip(truth, got, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def store_stats(store: Store, settings: Settings, *, recall_sample: int = 200) -> Stats:
    """Everything `stats` reports about an open store (read-only is enough)."""
    from search.clusters import cluster_summary  # imported late, as before: clustering is the heaviest module

    ident = store.model_identity()
    files = IndexFiles(store, settings)
    return Stats(
        **store.counts(settings),
        model={
            "architecture": ident.architecture if ident else None,
            "weights_sha256": ident.weights_sha256 if ident else None,
            "embedding_dim": ident.embedding_dim if ident else None,
            "preprocessing": ident.preprocessing if ident else None,
        },
        indexes=files.freshness() if ident else {},
        recall_at_10=recall_at_k(store, files, settings, recall_sample) if ident else None,
        runs=store.recent_runs(5),
        vectors_by_backend=store.vectors_by_engine(),
        known_unsafe_rule={
            "model": f"{settings.nsfw_level} >= {settings.nsfw_threshold}",
            "hash_list_max_distance": settings.pdq_max_distance,
        },
        clusters=cluster_summary(store, settings),
    )
