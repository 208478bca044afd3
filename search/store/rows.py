"""Rows of the images table: the record the pipeline writes, the typed row answers read, and embedding BLOBs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from search.answers import ImageRow, Levels, PdqInfo
from search.settings import LEVELS

#: The images columns answers read (everything but the embedding), in table order.
IMAGE_COLUMNS = (
    "id, sha256, size, width, height, format, p_neutral, p_low, p_medium, p_high, "
    "s_neutral, s_low, s_medium, s_high, level, pdq, pdq_quality, run_id, indexed_at"
)


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Thumbnail:
    """One image's thumbnails (`indexer.thumbnails`): a small JPEG and a server-side blurred JPEG of the same size."""

    width: int
    height: int
    original: bytes
    blurred: bytes


@dataclass
class ImageRecord:
    """One image's row, as the pipeline writes it."""

    sha256: str
    size: int
    width: int
    height: int
    format: str
    probabilities: Sequence[float]
    scores: Sequence[float]
    level: str
    embedding: np.ndarray
    pdq: str | None = None
    pdq_quality: int | None = None
    thumbnail: Thumbnail | None = None  # only in a store created with `index --thumbnails`
    pdq_dihedral: tuple[str, ...] | None = None  # the 7 other dihedral PDQ hashes (search.pdq.DIHEDRAL[1:] order)


def blob(v: np.ndarray) -> bytes:
    """An embedding as the float32 BLOB the images table stores."""
    return np.ascontiguousarray(v, dtype=np.float32).tobytes()


def vectors_from_blobs(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()


def image_row(row: Mapping[str, Any]) -> ImageRow:
    """A SQLite images row (IMAGE_COLUMNS, no embedding) -> the typed row answers use."""
    return ImageRow(
        id=row["id"],
        sha256=row["sha256"],
        size=row["size"],
        width=row["width"],
        height=row["height"],
        format=row["format"],
        probabilities=Levels.of({lv: row[f"p_{lv}"] for lv in LEVELS}),
        scores=Levels.of({lv: row[f"s_{lv}"] for lv in LEVELS}),
        level=row["level"],
        pdq=PdqInfo(hash=row["pdq"], quality=row["pdq_quality"]),
        run_id=row["run_id"],
        indexed_at=row["indexed_at"],
    )
