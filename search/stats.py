"""`stats`: counts, levels, known-unsafe, index freshness, recall of an approximate index, model identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

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


def store_stats(store_dir: Path, settings: Settings, *, recall_sample: int = 200) -> dict[str, Any]:
    with Store(store_dir, readonly=True) as store:
        data = store.counts(settings)
        ident = store.model_identity() or {}
        data["model"] = {k: ident.get(k) for k in ("architecture", "weights_sha256", "embedding_dim", "preprocessing")}
        files = IndexFiles(store, settings)
        data["indexes"] = files.freshness() if ident else {}
        data["recall_at_10"] = recall_at_k(store, files, settings, recall_sample) if ident else None
        data["runs"] = [
            dict(zip(("id", "status", "started_at", "finished_at"), r, strict=True))
            for r in store.db.execute("SELECT id, status, started_at, finished_at FROM runs ORDER BY id DESC LIMIT 5")
        ]
        data["known_unsafe_rule"] = {
            "model": f"{settings.nsfw_level} >= {settings.nsfw_threshold}",
            "hash_list_max_distance": settings.pdq_max_distance,
        }
        from search.clusters import cluster_summary

        data["clusters"] = cluster_summary(store, settings)
        return data
