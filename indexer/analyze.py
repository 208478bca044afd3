"""One image's full analysis from its bytes: safe decode, PDQ, one forward pass; and the query answer built on it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from indexer.decode import DecodedImage, decode_image
from indexer.extractor import Extractor, ImageResult
from search.errors import InvalidImage
from search.pdq import compute_pdq
from search.query import Searcher
from search.settings import Settings
from search.store import ImageRecord


@dataclass
class Analysis:
    name: str
    sha256: str
    size: int
    decoded: DecodedImage
    pdq: str | None
    pdq_quality: int | None
    result: ImageResult

    def record(self) -> ImageRecord:
        return self.result.to_record(
            sha256=self.sha256,
            size=self.size,
            width=self.decoded.width,
            height=self.decoded.height,
            format=self.decoded.format,
            pdq=self.pdq,
            pdq_quality=self.pdq_quality,
        )


def analyze(ex: Extractor, items: Sequence[tuple[str, bytes]], settings: Settings) -> list[Analysis | InvalidImage]:
    """Decode every (name, bytes) safely and run the good ones through the model in one batch."""
    prepared: list[tuple[str, bytes, DecodedImage, torch.Tensor] | InvalidImage] = []
    for name, data in items:
        try:
            dec = decode_image(data, name, max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels)
            prepared.append((name, data, dec, ex.preprocess(dec.image)))
        except InvalidImage as e:
            prepared.append(e)
    good = [p for p in prepared if not isinstance(p, InvalidImage)]
    results = ex.run_tensors([p[3] for p in good]) if good else []
    it = iter(results)
    out: list[Analysis | InvalidImage] = []
    for p in prepared:
        if isinstance(p, InvalidImage):
            out.append(p)
            continue
        name, data, dec, _ = p
        try:
            pdq, quality = compute_pdq(dec.image)
        except Exception:
            pdq, quality = None, None
        out.append(Analysis(name, hashlib.sha256(data).hexdigest(), len(data), dec, pdq, quality, next(it)))
    return out


def query_answer(
    a: Analysis,
    searcher: Searcher | None,
    *,
    k: int | None = None,
    sources: Sequence[str] | None = None,
    min_similarity: float | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """The answer `query --json` prints (without `path`) and `POST /v1/query` returns for one image."""
    ans: dict[str, Any] = {"nsfw": a.result.as_json(), "sha256": a.sha256}
    if searcher is None:
        ans.update(
            {
                "nearest_unsafe": [],
                "near_duplicates": [],
                "pdq": {"hash": a.pdq, "quality": a.pdq_quality, "matches": []},
            }
        )
        return ans
    ans.update(
        searcher.answer(
            a.result.embedding,
            pdq=a.pdq,
            quality=a.pdq_quality,
            k=k,
            sources=sources,
            min_similarity=min_similarity,
            threshold=threshold,
        )
    )
    # content already in the store is its own exact duplicate: say so instead of listing it as a near-duplicate
    ids = searcher.store.ids_by_sha([a.sha256])
    ans["indexed_id"] = ids.get(a.sha256)
    return ans
