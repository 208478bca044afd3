"""What the routers share: the documented error responses, multipart request bodies, search options and timings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from api import schemas
from api.worker import BatchInfo

BINARY = {"type": "string", "format": "binary"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: every listed status answers an ErrorResponse."""
    return {s: {"model": schemas.ErrorResponse} for s in statuses}


def multipart(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """`openapi_extra=` documenting a multipart body (the routes parse it themselves: api.uploads)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@dataclass(frozen=True)
class SearchOptions:
    """The query parameters of a search, as Searcher.answer/neighbours and query_answer take them."""

    k: int | None = None
    sources: list[str] | None = None
    min_similarity: float | None = None
    threshold: float | None = None

    @classmethod
    def of(
        cls, k: int | None, source: Sequence[str] | None, min_similarity: float | None, threshold: float | None
    ) -> SearchOptions:
        return cls(k, list(source) if source else None, min_similarity, threshold)

    def kwargs(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "sources": self.sources,
            "min_similarity": self.min_similarity,
            "threshold": self.threshold,
        }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def query_timings(info: BatchInfo, search_s: float, t0: float) -> schemas.QueryTimings:
    """How a request that ran the model spent its time (`t0`: when it arrived)."""
    return schemas.QueryTimings(
        queue_ms=round(info.queue_ms, 3),
        inference_ms=round(info.inference_ms, 3),
        batch_images=info.batch_images,
        search_ms=ms(search_s),
        total_ms=ms(time.perf_counter() - t0),
    )
