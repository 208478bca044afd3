"""`stats`: counts, levels, known-unsafe, index freshness, recall of an approximate index, model identity."""

from __future__ import annotations

import faiss
import numpy as np

from search.answers import Stats
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, set_search_params


def recall_at_k(store: Store, files: IndexFiles, settings: Settings, sample: int, k: int = 10) -> float | None:
    """Recall@k of the stored approximate index against exact inner-product search, on a sample of stored vectors."""
    if sample <= 0:  # before loading: the index file can be large
        return None
    snap = files.load("all")
    if snap is None or snap.manifest.get("factory", "Flat") == "Flat" or snap.index.ntotal == 0:
        return None
    set_search_params(snap.index, settings)
    all_ids, all_vecs = [], []
    for ids, vecs in store.iter_vectors(0, int(snap.manifest.get("watermark", 0))):
        all_ids.append(ids)
        all_vecs.append(vecs)
    ids = np.concatenate(all_ids)
    x = np.concatenate(all_vecs)
    rng = np.random.default_rng(0)
    q = x[rng.choice(len(x), min(sample, len(x)), replace=False)]
    kk = min(k, len(x))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(q, kk)
    _, got = snap.index.search(q, kk)
    truth_ids = ids[truth]
    hits = sum(len(set(t.tolist()) & set(g.tolist())) for t, g in zip(truth_ids, got, strict=True))
    return hits / (len(q) * kk)


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
        known_unsafe_rule={
            "model": f"{settings.nsfw_level} >= {settings.nsfw_threshold}",
            "hash_list_max_distance": settings.pdq_max_distance,
        },
        clusters=cluster_summary(store, settings),
    )
