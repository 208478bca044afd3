"""Typed answers of the banks a team keeps beside the index: imported PDQ hash lists (import, list, show, delete)
and linear probes (train, list). Built on `search.answer_base.Answer`; `search.answers` re-exports them."""

from __future__ import annotations

import builtins
from typing import Any, Literal

from pydantic import Field

from search.answer_base import Answer, _absent


class BadLine(Answer):
    line: int
    text: str
    reason: str


class HashListImport(Answer):
    list: str
    list_id: int
    hashes: int = Field(description="Entries the list holds now.")
    imported: int = Field(description="Valid hashes in this upload.")
    bad_lines: builtins.list[BadLine] = Field(description="Lines that hold no valid PDQ hash.")
    matched_images: int = Field(description="Indexed images within the configured PDQ distance of the list.")
    unsafe_index_updated: bool


class HashListEvent(Answer):
    """One thing done to a hash list (append-only; a deleted list's events stay)."""

    event: int
    action: Literal["import", "replace", "delete"]
    who: str
    at: str
    entries: int = Field(description="Entries the list held after the event (0 after a delete).")
    changed: int = Field(description="Entries added (import, replace) or removed (delete).")
    source: str | None = Field(None, exclude_if=_absent, description="Where an import came from.")
    reason: str | None = Field(None, exclude_if=_absent, description="Why (a delete's --reason).")


class HashListSummary(Answer):
    """One imported hash list (`nsfw-index hash-lists list`, `GET /v1/hash-lists`)."""

    name: str
    list_id: int
    entries: int = Field(description="PDQ hashes the list holds.")
    imported_at: str = Field(description="When the latest import into it happened.")
    imported_by: str | None = Field(description="Who made the latest import (null: not recorded, an older store).")
    source: str | None = Field(description="Where the latest import came from (a file path, or the HTTP upload).")
    bad_lines: int = Field(description="Lines without a valid hash, over all its imports.")
    matched_images: int = Field(
        description="Stored images within the configured PDQ distance of an entry (any dihedral transform)."
    )
    matched_by_transform: dict[str, int] = Field(
        description="matched_images by the transform of their closest match (original, rot90, flipH, ...)."
    )


class HashListDetail(HashListSummary):
    """One hash list with its history (`nsfw-index hash-lists show`, `GET /v1/hash-lists/{name}`)."""

    max_distance: int = Field(description="The PDQ distance matched_images counts at.")
    images_without_dihedral: int = Field(
        description="Stored images with a PDQ hash but no dihedral hashes (indexed before they were kept): they "
        "match on their original hash only."
    )
    events: builtins.list[HashListEvent] = Field(description="What was done to lists of this name, oldest first.")


class HashListDeleted(Answer):
    """A deleted hash list (`nsfw-index hash-lists delete`, `DELETE /v1/hash-lists/{name}`)."""

    name: str
    entries_removed: int
    images_unmatched: int = Field(
        description="Images that matched the list (configured distance) and now match no list."
    )
    no_longer_known_unsafe: builtins.list[int] = Field(
        description="Ids of images that were known-unsafe through this list only and are not any more."
    )
    event: HashListEvent
    unsafe_index_updated: bool


class ProbeScores(Answer):
    """Precision, recall and ROC AUC of one scorer on the labelled images (None: not defined for them)."""

    precision: float | None
    recall: float | None
    roc_auc: float | None


class ClassScores(Answer):
    precision: float
    recall: float
    support: int = Field(description="Labelled images of this class.")


class ProbeMetrics(Answer):
    """How a probe did under stratified k-fold cross-validation (out-of-fold predictions of every labelled image)."""

    folds: int
    average: Literal["unsafe", "macro"] = Field(
        description="`unsafe`: the unsafe/safe label set, scores of the class unsafe; `macro`: a custom label set, "
        "the mean over classes (ROC AUC one-vs-rest)."
    )
    probe: ProbeScores
    base_model: ProbeScores | None = Field(
        description="The base model on the same images (its verdict for precision/recall, its score for ROC AUC); "
        "only for the unsafe/safe label set."
    )
    base_model_rule: str | None = Field(None, description="The base model's verdict rule used.")
    per_class: dict[str, ClassScores]


class ProbeInfo(Answer):
    """A stored probe (`nsfw-index probes --json`)."""

    name: str
    classes: builtins.list[str]
    examples: int = Field(description="Labelled images it was trained on.")
    class_counts: dict[str, int]
    label_source: str = Field(description="`labels` (the human label log) or `csv:<file name>`.")
    label_watermark: int = Field(description="The latest label event id in the log when it was trained.")
    label_events_since: int | None = Field(
        description="Label events appended since (a reason to train again); None for a CSV label set."
    )
    trained_at: str
    model: dict[str, Any] = Field(description="The embedding model it was trained on (architecture, weights sha256).")
    applies: bool = Field(
        description="False when the store's vectors now come from another model: left out of answers."
    )
    metrics: ProbeMetrics


class ProbeTraining(ProbeInfo):
    """`nsfw-index train-probe --json`."""

    replaced: bool = Field(description="A probe of that name existed and was replaced.")
    fit_seconds: float
