"""Files on disk through the model: the engine of the `score` verb (no store) and of the `query` verb (a Searcher).
Both take what `index` takes: files, directories, `@list.txt` files and tar shards (`indexer.corpus.walk`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from indexer.analyze import analyze_files, analyze_items, query_answer
from indexer.corpus import Item, TarReader, read_item, walk
from indexer.extractor import Extractor, ImageResult
from search.answers import QueryAnswer
from search.errors import InvalidImage
from search.policy import ModelIdentity
from search.query import Searcher
from search.settings import Settings
from search.store import Store


def read_inputs(
    inputs: Iterable[str | Path], settings: Settings, *, all_files: bool = False
) -> Iterator[tuple[str, bytes | InvalidImage]]:
    """(key, bytes) of every item the inputs name, as `index` walks them (tar members as `shard.tar::member`); an item
    that cannot be listed or read is its InvalidImage."""
    tars = TarReader()
    try:
        for entry in walk([str(i) for i in inputs], all_files=all_files):
            if not isinstance(entry, Item):
                yield entry.key, InvalidImage(entry.key, entry.reason, kind=entry.kind)
                continue
            try:
                yield entry.key, read_item(entry, settings.max_file_bytes, tars)
            except Exception as e:  # OSError, ValueError, tarfile errors: that item's problem
                kind = "too_large" if "exceeds" in str(e) else "unreadable"
                yield entry.key, InvalidImage(entry.key, f"cannot read: {getattr(e, 'strerror', None) or e}", kind=kind)
    finally:
        tars.close()


def score_inputs(
    inputs: Iterable[str | Path], settings: Settings, extractor: Extractor | None = None, *, all_files: bool = False
) -> Iterator[tuple[str, ImageResult | InvalidImage]]:
    """`score`: (key, result) of every item the inputs name (files, directories, @list.txt, tar shards), in walk
    order; an item that cannot be read or decoded yields its InvalidImage instead."""
    ex = extractor or Extractor.from_settings(settings)
    for key, a in analyze_items(ex, read_inputs(inputs, settings, all_files=all_files), settings):
        yield key, (a if isinstance(a, InvalidImage) else a.result)


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


def query_inputs(
    inputs: Iterable[str | Path],
    searcher: Searcher,
    settings: Settings,
    extractor: Extractor | None = None,
    *,
    all_files: bool = False,
    k: int | None = None,
    sources: Sequence[str] | None = None,
    min_similarity: float | None = None,
    threshold: float | None = None,
) -> Iterator[tuple[str, QueryAnswer | InvalidImage]]:
    """`query`: (key, answer) of every item the inputs name, in walk order: scores, nearest known-unsafe,
    near-duplicates and PDQ matches against the searcher's store; an item that cannot be read or decoded yields its
    InvalidImage instead. The model is checked against the store's before any file is read (ModelMismatch)."""
    ex = extractor or Extractor.from_settings(settings)
    require_same_model(searcher.store, ex.identity)
    for key, a in analyze_items(ex, read_inputs(inputs, settings, all_files=all_files), settings):
        if isinstance(a, InvalidImage):
            yield key, a
        else:
            yield (
                key,
                query_answer(a, searcher, k=k, sources=sources, min_similarity=min_similarity, threshold=threshold),
            )
