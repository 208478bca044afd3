"""The data of a Ray index run: batches between its stages, and its Parquet result shards (written, found again)."""

# Between the stages (Ray Data's numpy batches) a prepared image and a store record travel pickled, whole, between
# processes of this same code: whatever `Prepared` and `ImageRecord` hold arrives. The driver writes the records, a
# shard at a time, as Parquet files with plain columns in `<store>/ray-shards/<run key>/` (`write_shard`), then
# merges them into the store (`shard_rows`). Absent values travel as "" and b"" (never None: Arrow would type an
# all-None column as null).

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.prepare import Prepared
from search.settings import LEVELS
from search.store import ImageRecord, Thumbnail

SHARDS_DIR = "ray-shards"  # under the store directory
FORMAT = "nsfw-index-ray-shard/1"  # a shard's Parquet metadata; a file without it is not ours to reuse

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Failure:
    """A file the run could not analyse. `transient`: a read failure or a file that changed during the run (it says
    nothing about the content, so it is never kept in a shard)."""

    reason: str
    kind: str
    transient: bool = False


@dataclass(frozen=True)
class ShardRow:
    """One content hash of a shard: its store record, or why it failed."""

    sha256: str
    record: ImageRecord | None
    failure: Failure | None


def run_key(parts: Mapping[str, Any]) -> str:
    """The run directory's name: a hash of what decides the results (inputs, model, settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-d object array (np.array would make a 2-d array of equal-length bytes)."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _pickled(values: Sequence[Any]) -> np.ndarray:
    return objects([b"" if v is None else pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL) for v in values])


def _unpickled(column: np.ndarray) -> list[Any]:
    return [pickle.loads(bytes(v)) if len(v) else None for v in column]


# -- batches between the stages --
def prepared_batch(rows: Batch, outcomes: Sequence[Prepared | Failure]) -> Batch:
    """The decode stage's output: the work rows' ids with each prepared image (or its failure)."""
    bad = [o if isinstance(o, Failure) else None for o in outcomes]
    ok = [o if isinstance(o, Prepared) else None for o in outcomes]
    return {
        "w": rows["w"],
        "shard": rows["shard"],
        "sha256": rows["sha256"],
        "error": objects([f.reason if f else "" for f in bad]),
        "kind": objects([f.kind if f else "" for f in bad]),
        "transient": np.array([bool(f and f.transient) for f in bad], dtype=bool),
        "decode_seconds": np.array([p.seconds if p else 0.0 for p in ok], np.float64),
        "prepared": _pickled(ok),
    }


def prepared_from_batch(batch: Batch) -> list[Prepared | None]:
    """The prepared images of a decode batch, as `prepare_image` made them (None where it failed)."""
    return _unpickled(batch["prepared"])


def result_batch(batch: Batch, records: Sequence[ImageRecord | None], model_seconds: float) -> Batch:
    """The inference stage's output: the decode batch with each image's store record instead of its tensor."""
    out = {k: v for k, v in batch.items() if k != "prepared"}
    per_image = model_seconds / max(1, sum(r is not None for r in records))
    out.update(record=_pickled(records), model_seconds=np.full(len(records), per_image))
    return out


# -- shards --
def _fixed(rows: Sequence[Sequence[float] | np.ndarray | None], width: int, dtype: pa.DataType) -> pa.Array:
    flat = np.zeros((len(rows), width), np.float64 if dtype == pa.float64() else np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            flat[i] = np.asarray(r)
    mask = pa.array([r is None for r in rows], pa.bool_())
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), dtype), width, mask=mask)


def shard_table(batch: Batch, paths: Sequence[Sequence[str]], key: str, dim: int) -> pa.Table:
    """A shard's rows (one per content hash: the paths of this run holding it, the record or the failure), in work
    order. Transient failures are left out: a resumed run tries those files again."""
    keep = np.flatnonzero(~batch["transient"].astype(bool))
    recs: list[ImageRecord | None] = _unpickled(batch["record"][keep])
    thumbs = [r.thumbnail if r else None for r in recs]
    failed = [r is None for r in recs]
    col = pa.array
    table = pa.table(
        {
            "sha256": col([str(batch["sha256"][i]) for i in keep], pa.string()),
            "paths": col([list(paths[int(i)]) for i in keep], pa.list_(pa.string())),
            "size": col([r.size if r else None for r in recs], pa.int64()),
            "width": col([r.width if r else None for r in recs], pa.int32()),
            "height": col([r.height if r else None for r in recs], pa.int32()),
            "format": col([r.format if r else None for r in recs], pa.string()),
            "probabilities": _fixed([r.probabilities if r else None for r in recs], len(LEVELS), pa.float64()),
            "scores": _fixed([r.scores if r else None for r in recs], len(LEVELS), pa.float64()),
            "level": col([r.level if r else None for r in recs], pa.string()),
            "embedding": _fixed([r.embedding if r else None for r in recs], dim, pa.float32()),
            "pdq": col([r.pdq if r else None for r in recs], pa.string()),
            "pdq_quality": col([r.pdq_quality if r else None for r in recs], pa.int32()),
            "pdq_dihedral": col(
                [list(r.pdq_dihedral) if r and r.pdq_dihedral else None for r in recs], pa.list_(pa.string())
            ),
            "thumb_width": col([t.width if t else None for t in thumbs], pa.int32()),
            "thumb_height": col([t.height if t else None for t in thumbs], pa.int32()),
            "thumb_original": col([t.original if t else None for t in thumbs], pa.binary()),
            "thumb_blurred": col([t.blurred if t else None for t in thumbs], pa.binary()),
            "error": col(
                [str(batch["error"][i]) if f else None for i, f in zip(keep, failed, strict=True)], pa.string()
            ),
            "error_kind": col(
                [str(batch["kind"][i]) if f else None for i, f in zip(keep, failed, strict=True)], pa.string()
            ),
        }
    )
    return table.replace_schema_metadata({"format": FORMAT, "run_key": key})


def write_shard(directory: Path, number: int, table: pa.Table) -> Path:
    """Written under a temporary name, then renamed: a shard file that exists is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"shard-{number:05d}.parquet"
    tmp = directory / f".{final.name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def shard_number(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def finished_shards(directory: Path, key: str) -> list[tuple[Path, set[str]]]:
    """The complete shards of an earlier try of this run, in order, with the content hashes each holds. Leftover
    temporary files, and files that cannot be read or are not this run's shards, are deleted (they are recomputed)."""
    if not directory.is_dir():
        return []
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    out = []
    for path in sorted(directory.glob("shard-[0-9]*.parquet"), key=shard_number):
        try:
            meta = pq.read_schema(path).metadata or {}
            if meta.get(b"format") != FORMAT.encode() or meta.get(b"run_key") != key.encode():
                raise ValueError("not a shard of this run")
            shas = set(pq.read_table(path, columns=["sha256"]).column("sha256").to_pylist())
        except (OSError, ValueError, pa.ArrowException):
            path.unlink(missing_ok=True)
            continue
        out.append((path, shas))
    return out


def shard_rows(path: Path) -> Iterator[ShardRow]:
    """A shard's rows as store records (or failures)."""
    for r in pq.read_table(path).to_pylist():
        if r["error"] is not None:
            yield ShardRow(r["sha256"], None, Failure(r["error"], r["error_kind"]))
            continue
        thumb = None
        if r["thumb_width"] is not None:
            thumb = Thumbnail(r["thumb_width"], r["thumb_height"], r["thumb_original"], r["thumb_blurred"])
        record = ImageRecord(
            sha256=r["sha256"],
            size=r["size"],
            width=r["width"],
            height=r["height"],
            format=r["format"],
            probabilities=list(r["probabilities"]),
            scores=list(r["scores"]),
            level=r["level"],
            embedding=np.asarray(r["embedding"], np.float32),
            pdq=r["pdq"],
            pdq_quality=r["pdq_quality"],
            thumbnail=thumb,
            pdq_dihedral=tuple(r["pdq_dihedral"]) if r["pdq_dihedral"] else None,
        )
        yield ShardRow(r["sha256"], record, None)
