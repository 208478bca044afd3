"""Files on disk through the model: the engine of the `score` verb (no store) and of the `query` verb (a Searcher)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from indexer.analyze import analyze_files, query_answer
from indexer.extractor import Extractor, ImageResult
from search.answers import QueryAnswer
from search.errors import InvalidImage
from search.policy import ModelIdentity
from search.query import Searcher
from search.settings import Settings
from search.store import Store


def score_files(
    paths: Iterable[Path], settings: Settings, extractor: Extractor | None = None
) -> Iterator[tuple[Path, ImageResult | InvalidImage]]:
    """Yield (path, result) in input order; a file that cannot be read or decoded yields its InvalidImage instead."""
    ex = extractor or Extractor.from_settings(settings)
    for path, a in analyze_files(ex, paths, settings):
        yield path, (a if isinstance(a, InvalidImage) else a.result)


def require_same_model(store: Store, identity: ModelIdentity) -> None:
    """Refuse (ModelMismatch, naming what differs) to compare vectors of another model with the store's; a store
    that has recorded no model yet has nothing to compare with. Never writes (the store may be read-only)."""
    stored = store.model_identity()
    if stored is not None:
        identity.require_same_as(stored.stored(), f"the store at {store.root}")


def query_files(
    paths: Iterable[Path],
    searcher: Searcher,
    settings: Settings,
    extractor: Extractor | None = None,
    *,
    k: int | None = None,
    sources: Sequence[str] | None = None,
    min_similarity: float | None = None,
    threshold: float | None = None,
) -> Iterator[tuple[Path, QueryAnswer | InvalidImage]]:
    """Yield (path, answer) in input order: scores, nearest known-unsafe, near-duplicates and PDQ matches of each file
    against the searcher's store; a file that cannot be read or decoded yields its InvalidImage instead.

    The model is checked against the store's before any file is read (ModelMismatch)."""
    ex = extractor or Extractor.from_settings(settings)
    require_same_model(searcher.store, ex.identity)
    for path, a in analyze_files(ex, paths, settings):
        if isinstance(a, InvalidImage):
            yield path, a
        else:
            yield (
                path,
                query_answer(a, searcher, k=k, sources=sources, min_similarity=min_similarity, threshold=threshold),
            )
