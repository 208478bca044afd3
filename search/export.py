"""Export a store to Parquet for notebooks: ids, sha256, paths, scores, level, known-unsafe sources, embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from search.settings import LEVELS, Settings
from search.store import Store


def export_parquet(store: Store, out: Path, settings: Settings, *, embeddings: bool = True) -> int:
    """Write every image of an open store to `out` (atomically); returns the rows written."""
    ids: list[int] = []
    vecs: list[np.ndarray] = []
    if store.count_images():
        for chunk_ids, chunk in store.iter_vectors():
            ids.extend(int(i) for i in chunk_ids)
            vecs.append(chunk)
    rows = store.images(ids)
    paths = store.paths_of(ids)
    unsafe = store.known_unsafe(settings)
    labels = store.current_labels()
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.int64()),
        "sha256": pa.array([rows[i].sha256 for i in ids], pa.string()),
        "paths": pa.array([paths[i] for i in ids], pa.list_(pa.string())),
        "level": pa.array([rows[i].level for i in ids], pa.string()),
        **{f"score_{lv}": pa.array([rows[i].scores[lv] for i in ids], pa.float64()) for lv in LEVELS},
        **{f"prob_{lv}": pa.array([rows[i].probabilities[lv] for i in ids], pa.float64()) for lv in LEVELS},
        "known_unsafe_sources": pa.array([unsafe.get(i, []) for i in ids], pa.list_(pa.string())),
        "label": pa.array([labels.get(i) for i in ids], pa.string()),
        "pdq": pa.array([rows[i].pdq.hash for i in ids], pa.string()),
        "pdq_quality": pa.array([rows[i].pdq.quality for i in ids], pa.int32()),
        "width": pa.array([rows[i].width for i in ids], pa.int32()),
        "height": pa.array([rows[i].height for i in ids], pa.int32()),
    }
    if embeddings:
        dim = store.embedding_dim() if ids else 0
        flat = np.concatenate(vecs).reshape(-1) if vecs else np.zeros(0, np.float32)
        cols["embedding"] = (
            pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
            if ids
            else pa.array([], pa.list_(pa.float32()))
        )
    table = pa.table(cols)
    ident = store.model_identity()
    table = table.replace_schema_metadata(
        {
            "nsfw_index.model_architecture": str(ident.architecture if ident else None),
            "nsfw_index.model_weights_sha256": str(ident.weights_sha256 if ident else None),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return len(ids)
