"""Analysing images: prepared (`indexer.prepare`) and run through the model in batches; the query answer built on it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from indexer.decode import read_file_bytes
from indexer.extractor import Extractor, ImageResult
from indexer.prepare import Prepared, prepare_or_error
from search.answers import ExactDuplicates, Pdq, QueryAnswer
from search.errors import InvalidImage
from search.query import Searcher
from search.settings import Settings
from search.store import ImageRecord


@dataclass(frozen=True)
class Analysis:
    """One image, prepared and through the model."""

    prepared: Prepared
    result: ImageResult

    @property
    def name(self) -> str:
        return self.prepared.name

    @property
    def sha256(self) -> str:
        return self.prepared.sha256

    @property
    def size(self) -> int:
        return self.prepared.size

    @property
    def pdq(self) -> str | None:
        return self.prepared.pdq

    @property
    def pdq_quality(self) -> int | None:
        return self.prepared.pdq_quality

    def record(self) -> ImageRecord:
        """The store row of this image."""
        p = self.prepared
        record = self.result.to_record(
            sha256=p.sha256,
            size=p.size,
            width=p.width,
            height=p.height,
            format=p.format,
            pdq=p.pdq,
            pdq_quality=p.pdq_quality,
        )
        record.thumbnail = p.thumbnail  # made only when the store keeps thumbnails
        record.pdq_dihedral = p.pdq_dihedral
        return record


def analyze_prepared(ex: Extractor, prepared: Sequence[Prepared | InvalidImage]) -> list[Analysis | InvalidImage]:
    """Run the prepared images through the model (refusals pass through in place)."""
    good = [p for p in prepared if isinstance(p, Prepared)]
    results = iter(ex.run_prepared(good))
    return [p if isinstance(p, InvalidImage) else Analysis(p, next(results)) for p in prepared]


def analyze(ex: Extractor, items: Sequence[tuple[str, bytes]], settings: Settings) -> list[Analysis | InvalidImage]:
    """Prepare every (name, bytes) and run the good ones through the model; a refused image is its InvalidImage."""
    return analyze_prepared(
        ex,
        [
            prepare_or_error(
                name, data, transform=ex.transform, max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels
            )
            for name, data in items
        ],
    )


def read_or_error(path: Path, settings: Settings) -> bytes | InvalidImage:
    """A file's bytes under the byte cap (never a FIFO or a device), or the InvalidImage that says why not."""
    try:
        return read_file_bytes(path, max_bytes=settings.max_file_bytes)
    except InvalidImage as e:
        return e


def analyze_items(
    ex: Extractor, items: Iterable[tuple[str, bytes | InvalidImage]], settings: Settings
) -> Iterator[tuple[str, Analysis | InvalidImage]]:
    """(name, analysis) in input order for (name, bytes) items, `settings.batch_size` per forward pass; an item that
    is already an InvalidImage (it could not be read) passes through."""
    pending: list[tuple[str, Prepared | InvalidImage]] = []

    def flush() -> Iterator[tuple[str, Analysis | InvalidImage]]:
        done = analyze_prepared(ex, [p for _, p in pending])
        yield from zip([name for name, _ in pending], done, strict=True)
        pending.clear()

    for name, data in items:
        if isinstance(data, InvalidImage):
            pending.append((name, data))
        else:
            prepared = prepare_or_error(
                name, data, transform=ex.transform, max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels
            )
            pending.append((name, prepared))
        if len(pending) >= settings.batch_size:
            yield from flush()
    yield from flush()


def analyze_files(
    ex: Extractor, paths: Iterable[Path], settings: Settings
) -> Iterator[tuple[Path, Analysis | InvalidImage]]:
    """(path, analysis) in input order, `settings.batch_size` files per forward pass: read, prepare, run."""
    paths = list(paths)
    items = ((str(path), read_or_error(path, settings)) for path in paths)
    for path, (_, a) in zip(paths, analyze_items(ex, items, settings), strict=True):
        yield path, a


def query_answer(
    a: Analysis,
    searcher: Searcher | None,
    *,
    k: int | None = None,
    sources: Sequence[str] | None = None,
    min_similarity: float | None = None,
    threshold: float | None = None,
) -> QueryAnswer:
    """The answer `query --json` prints (with `path`) and `POST /v1/query` returns for one image."""
    nsfw = a.result.nsfw()
    if searcher is None:
        return QueryAnswer(
            nsfw=nsfw,
            sha256=a.sha256,
            nearest_unsafe=[],
            near_duplicates=[],
            pdq=Pdq(hash=a.pdq, quality=a.pdq_quality, matches=[]),
        )
    indexed_id = searcher.indexed_id(a.sha256)
    exclude = [] if indexed_id is None else [indexed_id]
    found = searcher.answer(
        a.result.embedding,
        pdq=a.pdq,
        quality=a.pdq_quality,
        pdq_dihedral=a.prepared.pdq_dihedral,
        k=k,
        sources=sources,
        min_similarity=min_similarity,
        threshold=threshold,
        exclude=exclude,
    )
    exact = None
    if indexed_id is not None:
        # content already in the store: it is not its own neighbour (as GET /v1/images/{id}/neighbours answers);
        # its other copies are listed as exact duplicates
        found.pdq.matches = [m for m in found.pdq.matches if m.id != indexed_id]
        paths = searcher.paths_of(indexed_id)
        exact = ExactDuplicates(count=max(0, len(paths) - 1), paths=paths)
    return QueryAnswer(
        nsfw=nsfw,
        sha256=a.sha256,
        nearest_unsafe=found.nearest_unsafe,
        near_duplicates=found.near_duplicates,
        pdq=found.pdq,
        indexed_id=indexed_id,
        exact_duplicates=exact,
        probes=found.probes,
    )
