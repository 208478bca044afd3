"""Export a store for notebooks and pipelines, as Parquet or CSV: ids, sha256, paths, scores, level, known-unsafe
sources, labels, PDQ, the store's probe outputs and (when asked) embeddings; `columns` picks what goes in."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from search.errors import InvalidArgument
from search.probes import Probe, active_probes
from search.settings import LEVELS, Settings
from search.store import Store

Format = Literal["parquet", "csv"]
FORMATS: tuple[str, ...] = ("parquet", "csv")
SCORE_COLUMNS = tuple(f"score_{lv}" for lv in LEVELS)
PROB_COLUMNS = tuple(f"prob_{lv}" for lv in LEVELS)
#: The columns every export can hold, in their default order (then the probe columns, then `embedding`).
BASE_COLUMNS: tuple[str, ...] = (
    "id",
    "sha256",
    "paths",
    "level",
    *SCORE_COLUMNS,
    *PROB_COLUMNS,
    "known_unsafe_sources",
    "label",
    "pdq",
    "pdq_quality",
    "width",
    "height",
)
EMBEDDING = "embedding"
_LISTS = {"paths", "known_unsafe_sources"}
_INTS = {"id": pa.int64(), "pdq_quality": pa.int32(), "width": pa.int32(), "height": pa.int32()}
_STRINGS = {"sha256", "level", "label", "pdq"}


def probe_column(probe: str, cls: str) -> str:
    """The export column of one probe class: `probe.NAME.CLASS` (`probes.NAME.CLASS` of the JSON answers)."""
    return f"probe.{probe}.{cls}"


def format_of(out: Path, fmt: str | None = None) -> Format:
    """The format asked for, else the one `out`'s extension names (`.csv`: CSV; anything else: Parquet)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise InvalidArgument(f"export format {fmt!r}: one of {', '.join(FORMATS)}")
        return "csv" if fmt == "csv" else "parquet"
    return "csv" if out.suffix.lower() == ".csv" else "parquet"


def _groups(probes: Sequence[Probe]) -> dict[str, list[str]]:
    """Names that stand for several columns in `columns`."""
    groups = {
        "scores": list(SCORE_COLUMNS),
        "probabilities": list(PROB_COLUMNS),
        "probes": [probe_column(p.name, c) for p in probes for c in p.classes],
    }
    groups.update({f"probe.{p.name}": [probe_column(p.name, c) for c in p.classes] for p in probes})
    return groups


def choose_columns(
    probes: Sequence[Probe], fmt: Format, columns: Sequence[str] | None = None, *, embeddings: bool | None = None
) -> list[str]:
    """The columns to write, in order. Default: every base column and every probe column, plus `embedding` in
    Parquet (unless `embeddings` is False; in CSV only when `embeddings` is True or `columns` names it). An unknown
    name is an InvalidArgument listing the valid ones (raised before anything is read or written)."""
    probe_cols = [probe_column(p.name, c) for p in probes for c in p.classes]
    if not columns:
        with_vectors = embeddings if embeddings is not None else fmt == "parquet"
        return [*BASE_COLUMNS, *probe_cols, *([EMBEDDING] if with_vectors else [])]
    groups = _groups(probes)
    valid = [*BASE_COLUMNS, *probe_cols, EMBEDDING]
    unknown = [c for c in columns if c not in valid and c not in groups]
    if unknown:
        raise InvalidArgument(
            f"unknown export column(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)} "
            f"(groups: {', '.join(groups)}); nothing written"
        )
    chosen = list(dict.fromkeys(c for name in columns for c in groups.get(name, [name])))
    if embeddings is False and EMBEDDING in chosen:
        raise InvalidArgument("--no-embeddings and a column list naming `embedding` contradict; nothing written")
    if embeddings and EMBEDDING not in chosen:
        chosen.append(EMBEDDING)
    return chosen


def export_store(
    store: Store,
    out: Path,
    settings: Settings,
    *,
    fmt: str | None = None,
    columns: Sequence[str] | None = None,
    embeddings: bool | None = None,
) -> int:
    """Write every image of an open store to `out` (atomically: a temporary file renamed), as Parquet or CSV
    (`format_of`); returns the rows written. Probe outputs are computed now from the stored vectors."""
    kind = format_of(out, fmt)
    probes = active_probes(store)
    chosen = choose_columns(probes, kind, columns, embeddings=embeddings)
    data = _collect(store, settings, chosen, probes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        if kind == "csv":
            _write_csv(tmp, chosen, data)
        else:
            _write_parquet(tmp, store, chosen, data, probes)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(data["_ids"])


def export_parquet(store: Store, out: Path, settings: Settings, *, embeddings: bool = True) -> int:
    """Parquet with every default column (`embeddings` False leaves the embedding out)."""
    return export_store(store, out, settings, fmt="parquet", embeddings=embeddings)


def _collect(store: Store, settings: Settings, chosen: Sequence[str], probes: Sequence[Probe]) -> dict[str, Any]:
    """The chosen columns as Python lists (the embedding as one (n, dim) array), in id order."""
    wanted_probes = [p for p in probes if any(probe_column(p.name, c) in chosen for c in p.classes)]
    ids = store.image_ids()
    vecs: list[np.ndarray] = []
    outs: dict[str, list[np.ndarray]] = {p.name: [] for p in wanted_probes}
    if ids and (EMBEDDING in chosen or wanted_probes):
        for _, chunk in store.iter_vectors():
            if EMBEDDING in chosen:
                vecs.append(chunk)
            for p in wanted_probes:
                outs[p.name].append(p.predict(chunk))
    rows = store.images(ids)
    data: dict[str, Any] = {"_ids": ids}
    need = set(chosen)
    if "paths" in need:
        paths = store.paths_of(ids)
        data["paths"] = [paths[i] for i in ids]
    if "known_unsafe_sources" in need:
        unsafe = store.known_unsafe(settings)
        data["known_unsafe_sources"] = [unsafe.get(i, []) for i in ids]
    if "label" in need:
        labels = store.current_labels()
        data["label"] = [labels.get(i) for i in ids]
    getters: dict[str, Any] = {
        "id": lambda r: r.id,
        "sha256": lambda r: r.sha256,
        "level": lambda r: r.level,
        "pdq": lambda r: r.pdq.hash,
        "pdq_quality": lambda r: r.pdq.quality,
        "width": lambda r: r.width,
        "height": lambda r: r.height,
    }
    for lv in LEVELS:
        getters[f"score_{lv}"] = lambda r, lv=lv: r.scores[lv]
        getters[f"prob_{lv}"] = lambda r, lv=lv: r.probabilities[lv]
    for name in chosen:
        if name in getters:
            data[name] = [getters[name](rows[i]) for i in ids]
    for p in wanted_probes:
        probs = np.concatenate(outs[p.name]) if outs[p.name] else np.zeros((0, len(p.classes)))
        for j, c in enumerate(p.classes):
            data[probe_column(p.name, c)] = probs[:, j].tolist()
    if EMBEDDING in chosen:
        dim = store.embedding_dim() if ids else 0
        data[EMBEDDING] = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)
    return data


def _write_parquet(
    path: Path, store: Store, chosen: Sequence[str], data: dict[str, Any], probes: Sequence[Probe]
) -> None:
    cols: dict[str, pa.Array] = {}
    for name in chosen:
        values = data[name]
        if name == EMBEDDING:
            n, dim = values.shape
            flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1), pa.float32())
            cols[name] = pa.FixedSizeListArray.from_arrays(flat, dim) if n else pa.array([], pa.list_(pa.float32()))
        elif name in _LISTS:
            cols[name] = pa.array(values, pa.list_(pa.string()))
        elif name in _INTS:
            cols[name] = pa.array(values, _INTS[name])
        elif name in _STRINGS:
            cols[name] = pa.array(values, pa.string())
        else:  # scores, probabilities, probe outputs
            cols[name] = pa.array(values, pa.float64())
    ident = store.model_identity()
    table = pa.table(cols).replace_schema_metadata(
        {
            "nsfw_index.model_architecture": str(ident.architecture if ident else None),
            "nsfw_index.model_weights_sha256": str(ident.weights_sha256 if ident else None),
            "nsfw_index.probes": json.dumps(
                {
                    p.name: {"classes": list(p.classes), "trained_at": p.trained_at, "watermark": p.label_watermark}
                    for p in probes
                }
            ),
        }
    )
    pq.write_table(table, path)


def _cell(name: str, value: Any) -> Any:
    """A CSV cell: lists as JSON text (paths may hold commas), None as an empty cell, floats in full."""
    if value is None:
        return ""
    if name in _LISTS:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return repr(value)
    return value


def _write_csv(path: Path, chosen: Sequence[str], data: dict[str, Any]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(chosen)
        for j in range(len(data["_ids"])):
            row = []
            for name in chosen:
                if name == EMBEDDING:  # float32 values in 9 significant digits: exact when read back as float32
                    row.append("[" + ",".join(f"{v:.9g}" for v in data[name][j].tolist()) + "]")
                else:
                    row.append(_cell(name, data[name][j]))
            writer.writerow(row)
