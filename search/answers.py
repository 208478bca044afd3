"""Typed answers of the engine (pydantic models): what `search` and `indexer` return, what the CLI's `--json`
prints (`to_json`) and what `api/schemas.py` builds its HTTP bodies from. One definition per shape."""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from search.answer_base import (
    PATHS_DESCRIPTION,
    PROBES_DESCRIPTION,
    Answer,
    LabelName,
    Level,
    Source,
    _absent,
)
from search.bank_answers import (
    BadLine,
    ClassScores,
    HashListDeleted,
    HashListDetail,
    HashListEvent,
    HashListImport,
    HashListSummary,
    ProbeInfo,
    ProbeMetrics,
    ProbeScores,
    ProbeTraining,
)
from search.settings import LEVELS

__all__ = [  # the bank answers live in search/bank_answers.py; importers keep one place to import answers from
    "PATHS_DESCRIPTION",
    "PROBES_DESCRIPTION",
    "Answer",
    "BadLine",
    "ClassScores",
    "HashListDeleted",
    "HashListDetail",
    "HashListEvent",
    "HashListImport",
    "HashListSummary",
    "LabelName",
    "Level",
    "ProbeInfo",
    "ProbeMetrics",
    "ProbeScores",
    "ProbeTraining",
    "Source",
]


class Levels(Answer):
    neutral: float
    low: float
    medium: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float] | Mapping[str, float]) -> Levels:
        """From 4 numbers in LEVELS order, or a mapping keyed by level."""
        if isinstance(values, Mapping):
            return cls(**{lv: float(values[lv]) for lv in LEVELS})
        return cls(**{lv: float(v) for lv, v in zip(LEVELS, values, strict=True)})

    def __getitem__(self, level: str) -> float:
        """`scores["medium"]`: levels read like the mapping they are."""
        if level not in LEVELS:
            raise KeyError(level)
        return float(getattr(self, level))

    def values(self) -> list[float]:
        return [float(getattr(self, lv)) for lv in LEVELS]


class Nsfw(Answer):
    """The classifier's answer, as `nsfw-index score --json` prints it."""

    probabilities: Levels
    scores: Levels = Field(description="Cumulative 'at least this level' scores (Freepik's formula).")
    level: Level
    is_nsfw: bool


class UnsafeNeighbour(Answer):
    id: int
    similarity: float
    scores: Levels
    level: Level
    sources: list[Source] = Field(description="Why this image is known-unsafe: human label, hash list, model score.")
    paths: list[str] | None = Field(None, exclude_if=_absent, description=PATHS_DESCRIPTION)


class NearDuplicate(Answer):
    id: int
    similarity: float


#: PDQ's dihedral transforms (search.pdq.DIHEDRAL, the order pdqhash returns them), Pillow's names: rot90 is a turn
#: of 90 degrees counter-clockwise, flipH mirrors left-right, flipV top-bottom.
PdqTransform = Literal["original", "rot90", "rot180", "rot270", "flipV", "flipH", "transpose", "transverse"]


class PdqMatch(Answer):
    source: Literal["hash_list", "human"]
    distance: int
    transform: PdqTransform = Field(
        "original",
        description="Which of the image's dihedral PDQ hashes matched: the image transformed so (rot90: turned 90 "
        "degrees counter-clockwise; flipH: mirrored left-right) matches. `original`: its own hash.",
    )
    list: str | None = Field(None, exclude_if=_absent, description="Hash list name (source hash_list).")
    entry: int | None = Field(None, exclude_if=_absent, description="The list entry's id (source hash_list).")
    hash: str | None = Field(None, exclude_if=_absent, description="The matching list entry (source hash_list).")
    note: str | None = Field(None, exclude_if=_absent, description="The entry's note, if its list gave one.")
    id: int | None = Field(None, exclude_if=_absent, description="The human-labelled image (source human).")


class PdqInfo(Answer):
    hash: str | None
    quality: int | None


class Pdq(PdqInfo):
    matches: builtins.list[PdqMatch]


class SearchAnswer(Answer):
    """The parts of a query answer that come from the store (nearest known-unsafe, near-duplicates, PDQ)."""

    nearest_unsafe: list[UnsafeNeighbour]
    near_duplicates: list[NearDuplicate]
    pdq: Pdq
    probes: dict[str, dict[str, float]] = Field(default_factory=dict, description=PROBES_DESCRIPTION)


class ExactDuplicates(Answer):
    count: int = Field(description="Other paths holding the same content.")
    paths: list[str] | None = Field(None, exclude_if=_absent, description=PATHS_DESCRIPTION)


class QueryAnswer(Answer):
    """One image's answer: `nsfw-index query --json` prints it with `path`; `POST /v1/query` with `filename`."""

    nsfw: Nsfw
    sha256: str
    nearest_unsafe: list[UnsafeNeighbour]
    near_duplicates: list[NearDuplicate]
    pdq: Pdq
    indexed_id: int | None = Field(None, description="The id of this exact content in the store, if it is indexed.")
    exact_duplicates: ExactDuplicates | None = Field(
        None,
        exclude_if=_absent,
        description="Only when this content is indexed (the answer then leaves the image itself out): the stored "
        "paths of this content, as GET /v1/images/{id}/neighbours lists them.",
    )
    probes: dict[str, dict[str, float]] = Field(default_factory=dict, description=PROBES_DESCRIPTION)


class EmbeddingAnswer(Answer):
    """The answer for a query embedding (`{"embedding": [...]}`, `query --embedding FILE.npy`): no image and no model
    run, so no `nsfw`, `sha256` or `pdq`; the vector is L2-normalised first. A stored image's own vector finds
    that image (similarity 1): nothing is left out."""

    nearest_unsafe: list[UnsafeNeighbour]
    near_duplicates: list[NearDuplicate]


class LabelEvent(Answer):
    event: int
    label: LabelName
    who: str
    at: str
    reason: str | None
    override_hash_lists: bool = Field(
        False, description="A `safe` event that also overrides the image's hash-list matches (explicit, with a reason)."
    )


class HashListOverride(Answer):
    """The human override of an image's hash-list matches: the current label event, a `safe` recorded with
    `override_hash_lists`. The matches themselves stay listed (`pdq.matches`); a later event ends the override."""

    event: int
    who: str
    at: str
    reason: str | None
    in_force: bool = Field(
        description="False once a hash list matching the image was imported (or imported again) after the override: "
        "the match counts again until it is overridden anew."
    )


class NeighboursAnswer(Answer):
    """The query answer for an indexed image, computed from its stored embedding (no model run)."""

    id: int
    nsfw: Nsfw
    known_unsafe_sources: list[Source]
    exact_duplicates: ExactDuplicates
    nearest_unsafe: list[UnsafeNeighbour]
    near_duplicates: list[NearDuplicate]
    pdq: Pdq
    hash_list_override: HashListOverride | None = Field(
        None, description="The human override of this image's hash-list matches, if its current label is one."
    )
    probes: dict[str, dict[str, float]] = Field(default_factory=dict, description=PROBES_DESCRIPTION)


class ImageRow(Answer):
    """One stored image (no embedding)."""

    id: int
    sha256: str
    size: int
    width: int
    height: int
    format: str
    probabilities: Levels
    scores: Levels
    level: Level
    pdq: PdqInfo
    run_id: int | None = None
    indexed_at: str


class ImageDetail(ImageRow):
    """One image with its verdict, known-unsafe sources and label history (`GET /v1/images/{id}`)."""

    is_nsfw: bool
    known_unsafe_sources: list[Source]
    label: Literal["unsafe", "safe"] | None = Field(description="The current human label (the latest event wins).")
    labels: list[LabelEvent] = Field(description="The label event log of this content, oldest first.")
    hash_list_override: HashListOverride | None = Field(
        None, description="The human override of this image's hash-list matches, if its current label is one."
    )
    path_count: int
    paths: list[str] | None = Field(None, exclude_if=_absent, description=PATHS_DESCRIPTION)
    probes: dict[str, dict[str, float]] = Field(default_factory=dict, description=PROBES_DESCRIPTION)
    external_id: str | None = Field(None, description="The caller's own id for this image (`POST /v1/images`).")


class Forgotten(Answer):
    """An image removed from the store (`nsfw-index forget`, `DELETE /v1/images/{id}`): row, paths, vector,
    thumbnails, cluster memberships and hash-list matches. Its label events stay (keyed by content)."""

    id: int
    sha256: str
    external_id: str | None
    paths: int = Field(description="Stored paths removed with it.")
    label_events_kept: int = Field(description="Label events of this content, kept in the append-only log.")
    who: str
    at: str
    run_id: int = Field(description="The run of kind `forget` that records the removal (the audit trail).")


class LabelResult(Answer):
    """One label event appended (`nsfw-index label --json` prints one per image)."""

    ref: str
    id: int
    label: LabelName
    event: int
    who: str
    at: str
    override_hash_lists: bool = False


class ClusterSummary(Answer):
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


class ClusterMember(Answer):
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


class ClusteringRef(Answer):
    id: int
    created_at: str
    threshold: float
    k: int


class ClusterPage(Answer):
    items: list[ClusterSummary]
    total: int
    page: int
    per_page: int
    fresh: bool = Field(description="False when images were added or removed since the clustering ran.")
    clustering: ClusteringRef | None = Field(None, description="The clustering run these come from.")


class ClusteringSummary(Answer):
    """The latest clustering in a few numbers; flags as of now (`stats` and `cluster --json`)."""

    clustering_id: int
    created_at: str
    images: int
    groups: int
    grouped_images: int
    clusters: int
    threshold: float
    k: int
    method: str
    flagged_groups: int
    flagged_clusters: int
    largest_groups: builtins.list[int]
    fresh: bool
    timings: dict[str, float]
    recomputed: bool | None = Field(
        None, exclude_if=_absent, description="`cluster` only: False when the stored clustering was up to date."
    )
    reason: str | None = Field(
        None, exclude_if=_absent, description="`cluster` only: why it recomputed, or 'up to date'."
    )


class Stats(Answer):
    """`nsfw-index stats --json` and `GET /v1/stats`."""

    images: int
    paths: int
    exact_duplicates: dict[str, int]
    errors: int
    levels: dict[str, int]
    known_unsafe: dict[str, int]
    labels: dict[str, int]
    hash_lists: builtins.list[dict[str, Any]]
    schema_version: int
    model: dict[str, Any]
    indexes: dict[str, Any]
    recall_at_10: float | None
    runs: builtins.list[dict[str, Any]]
    vectors_by_backend: builtins.list[dict[str, Any]] = Field(
        default_factory=list,
        description="Stored images per backend, dtype and runtime that produced their vectors (null: before runs "
        "recorded it). One weights file's vectors stay comparable across backends within the documented drift.",
    )
    known_unsafe_rule: dict[str, Any]
    clusters: ClusteringSummary | None


class VerifyCheck(Answer):
    """One check of `nsfw-index verify`."""

    name: str
    ok: bool
    problems: builtins.list[str] = Field(default_factory=list, description="What is wrong, one line each.")
    notes: builtins.list[str] = Field(default_factory=list, description="What is fine but worth knowing.")


class VerifyReport(Answer):
    """`nsfw-index verify --json`: SQLite integrity, the label chain, the FAISS files and their ids."""

    ok: bool
    checks: builtins.list[VerifyCheck]


class FileError(Answer):
    """One file that failed to index (`nsfw-index errors --json`): it is tried again once its size or mtime change."""

    path: str
    reason: str
    kind: str = Field(description="invalid, too_large, unsupported_format, unreadable, missing, symlink_loop, ...")
    run_id: int | None
    at: str
    size: int | None = Field(None, description="The size it had when it failed (None: not known).")
    mtime_ns: int | None = Field(None, description="Its mtime (ns) when it failed (None: not known).")
