"""The HTTP bodies (the OpenAPI schema clients see): the engine's answers (search.answers) plus what only HTTP has."""

from __future__ import annotations

import builtins
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from pydantic.json_schema import SkipJsonSchema

from search import answers
from search.answers import (
    PATHS_DESCRIPTION,
    Answer,
    ClusterDetail,
    ClusterMember,
    ClusterSummary,
    ExactDuplicates,
    HashListDeleted,
    HashListDetail,
    HashListEvent,
    HashListOverride,
    HashListSummary,
    LabelEvent,
    LabelName,
    Level,
    Levels,
    NearDuplicate,
    Nsfw,
    Pdq,
    PdqInfo,
    PdqMatch,
    Source,
    UnsafeNeighbour,
)

__all__ = [
    "PATHS_DESCRIPTION",
    "AddResponse",
    "BadLine",
    "ClusterDetail",
    "ClusterMember",
    "ClusterPage",
    "ClusterSummary",
    "EmbeddingResult",
    "ErrorBody",
    "ErrorResponse",
    "ExactDuplicates",
    "ForgetResponse",
    "HashListDeleted",
    "HashListDetail",
    "HashListEvent",
    "HashListOverride",
    "HashListResponse",
    "HashListSummary",
    "HashListsResponse",
    "HealthResponse",
    "ImageListResponse",
    "ImageResponse",
    "IndexInfo",
    "LabelEvent",
    "LabelRequest",
    "LabelResponse",
    "Level",
    "Levels",
    "ModelInfo",
    "NearDuplicate",
    "NeighboursResponse",
    "Nsfw",
    "Pdq",
    "PdqInfo",
    "PdqMatch",
    "QueryFailure",
    "QueryResponse",
    "QueryResult",
    "QueryTimings",
    "ReadyResponse",
    "SearchTimings",
    "Source",
    "StatsResponse",
    "UnsafeNeighbour",
]

BadLine = answers.BadLine


def _absent(value: Any) -> bool:
    """`exclude_if` predicate: a field left as None is left out of the JSON."""
    return value is None


# -- HTTP only: errors, the server's model and index, timings -------------------------------------------------------
class ErrorBody(Answer):
    code: str = Field(description="Short machine-readable code, e.g. not_found, unsupported_format, overloaded.")
    message: str = Field(description="What went wrong and how to fix it.")
    details: list[dict[str, Any]] | None = Field(None, exclude_if=_absent, description="Validation errors (422).")


class ErrorResponse(Answer):
    """Every error, on every route (unknown routes, 405 and request validation included)."""

    error: ErrorBody


class ModelInfo(Answer):
    architecture: str
    weights_sha256: str
    backend: str | None = Field(
        None, description="The runtime of this server's forward pass (torch, onnxruntime, openvino)."
    )
    dtype: str | None = Field(None, description="Its precision: fp32, bf16 or int8.")


class QueryTimings(Answer):
    queue_ms: float = Field(description="Waiting for the inference worker.")
    inference_ms: float = Field(description="Decode + PDQ + the batched forward pass this request was part of.")
    batch_images: int = Field(description="Images in that forward pass (several requests are batched together).")
    search_ms: float
    total_ms: float


class SearchTimings(Answer):
    search_ms: float
    total_ms: float


class IndexInfo(Answer):
    ready: bool
    images: int
    known_unsafe: int
    generation: int | None
    loaded_at: float | None = None
    problems: builtins.list[str] = Field(
        default_factory=list,
        description="Damage found in the FAISS files on disk (checksum mismatch, unreadable file): the server "
        "serves an index rebuilt from SQLite instead, so it stays ready; the next writer rewrites the file.",
    )


# -- queries -----------------------------------------------------------------------------------------------------------
class QueryResult(answers.QueryAnswer):
    """One image's answer: the fields of `nsfw-index query --json` (with `filename` for `path`)."""

    filename: str | None = Field(description="The upload's own filename, as the client sent it.")
    # always present over HTTP (null when the content is not indexed)
    indexed_id: int | None = Field(description="The id of this exact content in the store, if it is indexed.")

    @classmethod
    def of(cls, answer: answers.QueryAnswer, filename: str | None) -> QueryResult:
        return cls.model_validate({**answer.model_dump(), "filename": filename})


class QueryFailure(Answer):
    """An image of a multi-image request that could not be analysed (the others are still answered)."""

    filename: str | None
    status: int = Field(description="The HTTP status this image alone would have got (400, 413 or 415).")
    error: ErrorBody


class EmbeddingResult(answers.EmbeddingAnswer):
    """The answer for a query embedding (JSON `{"embedding": [...]}`): no model run, no `nsfw`, no `pdq`."""


class QueryResponse(Answer):
    results: list[QueryResult | QueryFailure | EmbeddingResult] = Field(
        description="One entry per image, in upload (or list) order; one EmbeddingResult for an embedding query."
    )
    model: ModelInfo
    index: IndexInfo
    timings: QueryTimings


class NeighboursResponse(answers.NeighboursAnswer):
    """The query answer for an indexed image, computed from its stored embedding (no model run)."""

    model: ModelInfo
    timings: SearchTimings


# -- images ------------------------------------------------------------------------------------------------------------
class ImageResponse(answers.ImageDetail):
    # the indexing run is the CLI's business (`nsfw-index show`); the HTTP body never had it
    run_id: SkipJsonSchema[int | None] = Field(None, exclude=True)


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: LabelName = Field(
        description="`safe` overrides the model's verdict only (a hash-list match still counts); `clear` withdraws "
        "the human label."
    )
    reason: str | None = Field(None, max_length=1000, description="Why; required with `override_hash_lists`.")
    who: str | None = Field(
        None,
        max_length=100,
        description="Optional reviewer name; recorded after the API key's own identity, never instead of it.",
    )
    override_hash_lists: StrictBool = Field(  # strict: 0/1 or "true" are refused (422), as the schema says
        False,
        description="With label `safe` and a `reason`: also override the image's hash-list matches (an explicit "
        "event in the label log; the matches stay listed). 422 when the image matches no hash list.",
    )

    @model_validator(mode="after")
    def _override_is_explicit(self) -> LabelRequest:
        if self.override_hash_lists and self.label != "safe":
            raise ValueError("override_hash_lists goes with label `safe` only")
        if self.override_hash_lists and not (self.reason and self.reason.strip()):
            raise ValueError("override_hash_lists needs a reason (kept in the label log)")
        return self


class LabelResponse(Answer):
    # the engine's LabelResult less the CLI's `ref`, with the image's sources after the label

    id: int
    label: LabelName
    event: int
    who: str = Field(description="What was recorded: `api-key:<first 6 hex of sha256(key)>[/who]`.")
    at: str
    override_hash_lists: bool = Field(description="This event also overrides the image's hash-list matches.")
    known_unsafe_sources: list[Source] = Field(description="The image's known-unsafe sources after this label.")

    @classmethod
    def of(cls, result: answers.LabelResult, sources: list[str]) -> LabelResponse:
        return cls.model_validate({**result.model_dump(exclude={"ref"}), "known_unsafe_sources": sources})


class AddResponse(Answer):
    id: int
    created: bool = Field(description="False when this exact content was already indexed.")
    external_id: str | None = Field(None, description="The image's external id (the form field `external_id`).")
    result: QueryResult
    model: ModelInfo
    timings: QueryTimings


class ImageListResponse(Answer):
    """`GET /v1/images?external_id=X`: the images with that external id (at most one)."""

    images: builtins.list[ImageResponse]


class ForgetResponse(answers.Forgotten):
    """`DELETE /v1/images/{id}`: what was removed; the label events stay (the audit trail outlives the image)."""


# -- hash lists --------------------------------------------------------------------------------------------------------
class HashListResponse(answers.HashListImport):
    bad_line_count: int
    bad_lines: builtins.list[BadLine] = Field(description="Lines that hold no valid PDQ hash (the first 1000).")

    @classmethod
    def of(cls, imported: answers.HashListImport, *, max_lines: int, max_text: int) -> HashListResponse:
        """All the bad lines counted, the first `max_lines` listed, each text cut to `max_text` characters."""
        bad = imported.bad_lines
        shown = [b.model_copy(update={"text": b.text[:max_text]}) for b in bad[:max_lines]]
        return cls.model_validate(
            {**imported.model_dump(), "bad_line_count": len(bad), "bad_lines": [b.model_dump() for b in shown]}
        )


class HashListsResponse(Answer):
    """`GET /v1/hash-lists`: every imported list, in import order."""

    lists: builtins.list[HashListSummary]


# -- clusters and stats ------------------------------------------------------------------------------------------------
class ClusterPage(answers.ClusterPage):
    # the schema clients have: an open object (the engine's ClusteringRef fields: id, created_at, threshold, k);
    # narrowing it would change the published OpenAPI document
    clustering: dict[str, Any] | None = Field(  # type: ignore[assignment]
        None, description="The clustering run these come from."
    )

    @classmethod
    def of(cls, page: answers.ClusterPage) -> ClusterPage:
        return cls.model_validate(page.model_dump())


class StatsResponse(answers.Stats):
    # the schema clients have: an open object (the engine's ClusteringSummary fields); see ClusterPage
    clusters: dict[str, Any] | None  # type: ignore[assignment]

    @classmethod
    def of(cls, stats: answers.Stats) -> StatsResponse:
        return cls.model_validate(stats.model_dump())


# -- service -----------------------------------------------------------------------------------------------------------
class HealthResponse(Answer):
    status: Literal["ok"]


class ReadyResponse(Answer):
    ready: bool
    model: ModelInfo
    index: IndexInfo
