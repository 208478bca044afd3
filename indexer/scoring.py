"""Scoring files without a store: decode safely, batch, one forward pass each batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from indexer.decode import read_image_file
from indexer.extractor import Extractor, ImageResult
from search.errors import InvalidImage
from search.settings import Settings


def score_files(
    paths: Iterable[Path], settings: Settings, extractor: Extractor | None = None
) -> Iterator[tuple[Path, ImageResult | InvalidImage]]:
    """Yield (path, result) in input order; a file that cannot be decoded yields its InvalidImage instead."""
    ex = extractor or Extractor.from_settings(settings)
    pending: list[tuple[Path, torch.Tensor | InvalidImage]] = []

    def flush() -> Iterator[tuple[Path, ImageResult | InvalidImage]]:
        good = [(i, t) for i, (_, t) in enumerate(pending) if isinstance(t, torch.Tensor)]
        results = ex.run_tensors([t for _, t in good]) if good else []
        by_index = {i: r for (i, _), r in zip(good, results, strict=True)}
        for i, (p, t) in enumerate(pending):
            yield p, (t if isinstance(t, InvalidImage) else by_index[i])
        pending.clear()

    for path in paths:
        try:
            _, decoded = read_image_file(path, max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels)
            pending.append((path, ex.preprocess(decoded.image)))
        except InvalidImage as e:
            pending.append((path, e))
        if len(pending) >= settings.batch_size:
            yield from flush()
    yield from flush()
