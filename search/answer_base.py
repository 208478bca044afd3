"""The base of the typed answers: `Answer` (one JSON form, `to_json`), the level/source/label literals and the shared
field descriptions (search/answers.py and search/bank_answers.py build on it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Level = Literal["neutral", "low", "medium", "high"]
Source = Literal["human", "hash_list", "model"]
LabelName = Literal["unsafe", "safe", "clear"]

#: `paths` fields are omitted (not null, not []) when the caller may not see paths: an empty list would claim that
#: the image has no paths.
PATHS_DESCRIPTION = "Stored paths of this content; present only for API keys with the read_paths right."
#: `probes` fields: always present ({} when the store has no probe), computed at read time from the embedding.
PROBES_DESCRIPTION = (
    "Custom linear probes of the store (`nsfw-index train-probe`): probe name -> class -> probability, from the "
    "embedding; {} when the store has none."
)


def _absent(value: Any) -> bool:
    """`exclude_if` predicate: a field left as None is left out of the JSON (hidden paths, optional fields)."""
    return value is None


class Answer(BaseModel):
    """Base of every answer: `to_json()` is the one JSON form (CLI `--json` and HTTP bodies alike)."""

    model_config = ConfigDict(extra="ignore")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
