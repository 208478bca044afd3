"""Pydantic models of every HTTP request and response body (they are the OpenAPI schema clients see)."""

from __future__ import annotations

import builtins
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Level = Literal["neutral", "low", "medium", "high"]
Source = Literal["human", "hash_list", "model"]


def _absent(value: Any) -> bool:
    """`exclude_if` predicate: a field left as None is left out of the JSON (hidden paths, optional match fields)."""
    return value is None


#: `paths` fields are omitted (not null, not []) when the caller lacks the read_paths right: an empty list would
#: claim that the image has no paths.
PATHS_DESCRIPTION = "Stored paths of this content; present only for API keys with the read_paths right."


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorBody(Model):
    code: str = Field(description="Short machine-readable code, e.g. not_found, unsupported_format, overloaded.")
    message: str = Field(description="What went wrong and how to fix it.")
    details: list[dict[str, Any]] | None = Field(None, exclude_if=_absent, description="Validation errors (422).")


class ErrorResponse(Model):
    """Every error, on every route (unknown routes, 405 and request validation included)."""

    error: ErrorBody


class Levels(Model):
    neutral: float
    low: float
    medium: float
    high: float


class Nsfw(Model):
    """The classifier's answer, as `nsfw-index score --json` prints it."""

    probabilities: Levels
    scores: Levels = Field(description="Cumulative 'at least this level' scores (Freepik's formula).")
    level: Level
    is_nsfw: bool


class UnsafeNeighbour(Model):
    id: int
    similarity: float
    scores: Levels
    level: Level
    sources: list[Source] = Field(description="Why this image is known-unsafe: human label, hash list, model score.")
    paths: list[str] | None = Field(None, exclude_if=_absent, description=PATHS_DESCRIPTION)


class NearDuplicate(Model):
    id: int
    similarity: float


class PdqMatch(Model):
    source: Literal["hash_list", "human"]
    distance: int
    list: str | None = Field(None, exclude_if=_absent, description="Hash list name (source hash_list).")
    hash: str | None = Field(None, exclude_if=_absent, description="The matching list entry (source hash_list).")
    id: int | None = Field(None, exclude_if=_absent, description="The human-labelled image (source human).")


class Pdq(Model):
    hash: str | None
    quality: int | None
    matches: list[PdqMatch]


class ModelInfo(Model):
    architecture: str
    weights_sha256: str


class QueryTimings(Model):
    queue_ms: float = Field(description="Waiting for the inference worker.")
    inference_ms: float = Field(description="Decode + PDQ + the batched forward pass this request was part of.")
    batch_images: int = Field(description="Images in that forward pass (several requests are batched together).")
    search_ms: float
    total_ms: float


class SearchTimings(Model):
    search_ms: float
    total_ms: float


class IndexInfo(Model):
    ready: bool
    images: int
    known_unsafe: int
    generation: int | None
    loaded_at: float | None = None


class QueryResult(Model):
    """One image's answer: the fields of `nsfw-index query --json` (with `filename` for `path`)."""

    filename: str | None = Field(description="The upload's own filename, as the client sent it.")
    sha256: str
    indexed_id: int | None = Field(description="The id of this exact content in the store, if it is indexed.")
    nsfw: Nsfw
    nearest_unsafe: list[UnsafeNeighbour]
    near_duplicates: list[NearDuplicate]
    pdq: Pdq


class QueryFailure(Model):
    """An image of a multi-image request that could not be analysed (the others are still answered)."""

    filename: str | None
    status: int = Field(description="The HTTP status this image alone would have got (400, 413 or 415).")
    error: ErrorBody


class QueryResponse(Model):
    results: list[QueryResult | QueryFailure] = Field(description="One entry per uploaded image, in upload order.")
    model: ModelInfo
    index: IndexInfo
    timings: QueryTimings


class ExactDuplicates(Model):
    count: int = Field(description="Other paths holding the same content.")
    paths: list[str] | None = Field(None, exclude_if=_absent, description=PATHS_DESCRIPTION)


class NeighboursResponse(Model):
    """The query answer for an indexed image, computed from its stored embedding (no model run)."""

    id: int
    nsfw: Nsfw
    known_unsafe_sources: list[Source]
    exact_duplicates: ExactDuplicates
    nearest_unsafe: list[UnsafeNeighbour]
    near_duplicates: list[NearDuplicate]
    pdq: Pdq
    model: ModelInfo
    timings: SearchTimings


class PdqInfo(Model):
    hash: str | None
    quality: int | None


class LabelEvent(Model):
    event: int
    label: Literal["unsafe", "safe", "clear"]
    who: str
    at: str
    reason: str | None


class ImageResponse(Model):
    id: int
    sha256: str
    size: int
    width: int
    height: int
    format: str
    probabilities: Levels
    scores: Levels
    level: Level
    is_nsfw: bool
    pdq: PdqInfo
    indexed_at: str
    known_unsafe_sources: list[Source]
    label: Literal["unsafe", "safe"] | None = Field(description="The current human label (the latest event wins).")
    labels: list[LabelEvent] = Field(description="The label event log of this content, oldest first.")
    path_count: int
    paths: list[str] | None = Field(None, exclude_if=_absent, description=PATHS_DESCRIPTION)


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Literal["unsafe", "safe", "clear"] = Field(description="`clear` withdraws the human label.")
    reason: str | None = Field(None, max_length=1000)
    who: str | None = Field(
        None,
        max_length=100,
        description="Optional reviewer name; recorded after the API key's own identity, never instead of it.",
    )


class LabelResponse(Model):
    id: int
    label: Literal["unsafe", "safe", "clear"]
    event: int
    who: str = Field(description="What was recorded: `api-key:<first 6 hex of sha256(key)>[/who]`.")
    at: str
    known_unsafe_sources: list[Source] = Field(description="The image's known-unsafe sources after this label.")


class AddResponse(Model):
    id: int
    created: bool = Field(description="False when this exact content was already indexed.")
    result: QueryResult
    model: ModelInfo
    timings: QueryTimings


class BadLine(Model):
    line: int
    text: str
    reason: str


class HashListResponse(Model):
    list: str
    list_id: int
    hashes: int = Field(description="Entries the list holds now.")
    imported: int = Field(description="Valid hashes in this upload.")
    bad_line_count: int
    bad_lines: builtins.list[BadLine] = Field(description="Lines that hold no valid PDQ hash (the first 1000).")
    matched_images: int = Field(description="Indexed images within the configured PDQ distance of the list.")
    unsafe_index_updated: bool


class ClusterSummary(Model):
    id: int
    kind: Literal["cluster", "group"] = Field(description="k-means cluster or near-duplicate group.")
    size: int
    mean_score: float | None = Field(description="Mean of the members' scores at `score_level`.")
    max_score: float | None
    unsafe_count: int = Field(description="Known-unsafe members, as of now.")
    flagged: bool = Field(description="Holds at least one known-unsafe image.")
    representative_id: int | None
    score_level: Level | None = Field(None, exclude_if=_absent)
    path_count: int | None = Field(None, exclude_if=_absent)
    cohesion: float | None = Field(None, exclude_if=_absent)


class ClusterPage(Model):
    items: list[ClusterSummary]
    total: int
    page: int
    per_page: int
    fresh: bool = Field(description="False when images were added or removed since the clustering ran.")
    clustering: dict[str, Any] | None = Field(None, description="The clustering run these come from.")


class ClusterMember(Model):
    id: int
    similarity: float | None = Field(None, exclude_if=_absent, description="To the representative.")
    scores: Levels
    level: Level
    sources: list[Source]
    path_count: int | None = Field(None, exclude_if=_absent)
    paths: list[str] | None = Field(None, exclude_if=_absent, description=PATHS_DESCRIPTION)


class ClusterDetail(ClusterSummary):
    members_total: int | None = Field(None, exclude_if=_absent)
    members: list[ClusterMember] = Field(description="Most similar to the representative first (at most `limit`).")


class StatsResponse(Model):
    images: int
    paths: int
    exact_duplicates: dict[str, int]
    errors: int
    levels: dict[str, int]
    known_unsafe: dict[str, int]
    labels: dict[str, int]
    hash_lists: list[dict[str, Any]]
    schema_version: int
    model: dict[str, Any]
    indexes: dict[str, Any]
    recall_at_10: float | None
    runs: list[dict[str, Any]]
    known_unsafe_rule: dict[str, Any]
    clusters: dict[str, Any] | None


class HealthResponse(Model):
    status: Literal["ok"]


class ReadyResponse(Model):
    ready: bool
    model: ModelInfo
    index: IndexInfo
