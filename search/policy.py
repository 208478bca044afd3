"""The policies written once: the NSFW verdict, what makes an image known-unsafe, and model identity."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from search.errors import ModelMismatch
from search.settings import Settings

#: Why an image is known-unsafe, in the order answers list them.
SOURCES: tuple[str, ...] = ("human", "hash_list", "model")
#: The label events a human can append.
LABELS: tuple[str, ...] = ("unsafe", "safe", "clear")
#: The identity fields a store records and compares: vectors of two models never share a store.
IDENTITY_KEYS: tuple[str, ...] = ("architecture", "weights_sha256", "preprocessing", "embedding_dim")


def is_nsfw(scores: Mapping[str, float], settings: Settings) -> bool:
    """The verdict: the score at `settings.nsfw_level` reaches `settings.nsfw_threshold` (default medium >= 0.5)."""
    return bool(scores[settings.nsfw_level] >= settings.nsfw_threshold)


def model_flags(settings: Settings) -> tuple[str, float]:
    """(score column, threshold) of the verdict, for the store's SQL: `s_<level> >= threshold`."""
    return f"s_{settings.nsfw_level}", float(settings.nsfw_threshold)


def unsafe_sources(
    *, label: str | None, hash_listed: bool, model_flagged: bool, hash_list_overridden: bool = False
) -> list[str]:
    """Why an image is known-unsafe (empty: it is not), from its current human label (`unsafe`, `safe` or None),
    whether an imported hash list holds a PDQ hash within the configured distance, the model's verdict, and whether
    the current label is an explicit override of the hash-list matches.

    A human `unsafe` always counts. A human `safe` overrides the model only: a hash-list match still counts unless
    the current label event is a `safe` that overrides hash lists explicitly (`label --safe --override-hash-lists`).
    """
    out: list[str] = []
    if label == "unsafe":
        out.append("human")
    if hash_listed and not (hash_list_overridden and label == "safe"):
        out.append("hash_list")
    if model_flagged and label != "safe":
        out.append("model")
    return out


def _norm(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class ModelIdentity:
    """What a store records so that it never mixes vectors of two models."""

    architecture: str
    weights_sha256: str
    preprocessing: dict[str, Any]
    embedding_dim: int
    num_classes: int = 4
    label_names: tuple[str, ...] = ("neutral", "low", "medium", "high")
    source: str = field(default="", compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
            "num_classes": self.num_classes,
            "label_names": list(self.label_names),
            "embedding_dim": self.embedding_dim,
            "source": self.source,
        }

    def stored(self) -> dict[str, Any]:
        """The fields a store records (JSON-normalised: tuples become lists)."""
        return {k: json.loads(_norm(getattr(self, k))) for k in IDENTITY_KEYS}

    @classmethod
    def from_stored(cls, info: Mapping[str, Any]) -> ModelIdentity:
        return cls(
            architecture=str(info.get("architecture")),
            weights_sha256=str(info.get("weights_sha256")),
            preprocessing=dict(info.get("preprocessing") or {}),
            embedding_dim=int(info.get("embedding_dim") or 0),
        )

    def differences(self, other: ModelIdentity | Mapping[str, Any]) -> list[str]:
        """The identity fields on which `self` and `other` disagree, each saying both values (empty: the same)."""
        theirs = other.stored() if isinstance(other, ModelIdentity) else dict(other)
        mine = self.stored()
        out = []
        for k in IDENTITY_KEYS:
            if _norm(mine.get(k)) != _norm(theirs.get(k)):
                a, b = mine.get(k), theirs.get(k)
                if k == "weights_sha256":
                    a, b = f"{str(a)[:12]}…", f"{str(b)[:12]}…"
                out.append(f"{k}: {a!r} vs {b!r}")
        return out

    def require_same_as(self, stored: Mapping[str, Any], where: str) -> None:
        """Raise ModelMismatch naming every difference when `stored` (a store's record) is another model."""
        diffs = ModelIdentity.from_stored(stored).differences(self)
        if diffs:
            raise ModelMismatch(
                f"{where} was built with another model than the one in use (store vs model: "
                + "; ".join(diffs)
                + "): similarities across models mean nothing. Use the store's --model, or re-embed everything "
                "with `nsfw-index index ... --rebuild`"
            )
