"""The verbs that build and maintain a store: `index`, `rebuild`, `stats`, `export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from indexer.cli.options import (
    EXIT_FAILED_ITEMS,
    emit,
    handle_errors,
    json_option,
    model_options,
    preflight_model,
    require_store,
    search_options,
    settings_from,
    store_option,
    verbose_option,
)
from indexer.cli.output import print_index_summary, print_stats, print_warnings


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@store_option
@model_options
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=None,
    help="Decode processes (default: cores - 1; 0 decodes in the main process).",
)
@click.option("--prune", is_flag=True, help="Drop recorded paths under the inputs that no longer exist.")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Re-embed everything with this model (a store built with other weights is refused otherwise).",
)
@click.option("--all-files", is_flag=True, help="Try every file in directories, not only image extensions.")
@click.option(
    "--index-factory",
    default=None,
    help="FAISS factory for the index over all images, e.g. Flat (default, exact), HNSW32, IVF4096,PQ64.",
)
@click.option(
    "--thumbnails",
    is_flag=True,
    help="Keep small thumbnails (and blurred variants) inside a new store, for the review page; later runs follow.",
)
@click.option(
    "--retry-errors",
    is_flag=True,
    help="Try files that failed before even when unchanged (by default they are skipped until they change).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@verbose_option
@json_option("Print the run summary as one JSON object.")
@handle_errors
def index(
    inputs: tuple[str, ...],
    prune: bool,
    rebuild: bool,
    all_files: bool,
    index_factory: str | None,
    thumbnails: bool,
    retry_errors: bool,
    quiet: bool,
    verbose: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Index images into a store: directories (recursive), files, @list.txt files and .tar shards.

    \b
    Example:
      nsfw-index index ~/corpus @more.txt shard-0001.tar --store ./store
    Re-runs are incremental (unchanged files are skipped, content is keyed by sha256) and resumable after a crash;
    files that failed are remembered too and tried again once they change (or with --retry-errors).
    Exit status 0 when every input is indexed (or unchanged), 1 when some files are in error (they are recorded
    with the reason: `nsfw-index errors --store DIR`), 2 when nothing could be done (usage, model or store problem).
    """
    settings = settings_from(**flags)
    store_dir = require_store(settings)
    preflight_model(settings)  # a missing model fails before torch is even imported
    from indexer.capture import capture_warnings
    from indexer.service import index_inputs
    from indexer.summary import Progress
    from search.store import Store

    with (
        capture_warnings() as captured,
        Store.writing(store_dir, "nsfw-index index", create=True) as store,
    ):
        summary = index_inputs(
            store,
            list(inputs),
            settings,
            prune=prune,
            rebuild=rebuild,
            all_files=all_files,
            index_factory=index_factory,
            progress=Progress(not quiet, file=captured.stream),
            thumbnails=thumbnails,
            retry_errors=retry_errors,
        )
    summary.warnings = captured.lines
    if as_json:
        emit({"run_id": summary.run_id, **summary.counts(), "warnings": captured.count, "timings": summary.timings})
    elif not quiet:
        print_index_summary(summary, pruned=prune, store=store_dir, warnings=captured.count, verbose=verbose)
    if summary.failed:
        sys.exit(EXIT_FAILED_ITEMS)


@click.command()
@store_option
@search_options
@json_option()
@click.option(
    "--recall-sample",
    type=click.IntRange(0),
    default=200,
    help="Queries used to measure recall@10 of an approximate index against exact search (0: skip).",
)
@handle_errors
def stats(store: Path | None, as_json: bool, recall_sample: int, nprobe: int | None, ef_search: int | None) -> None:
    """Counts, levels, known-unsafe, index freshness and the model identity of a store.

    \b
    Example:
      nsfw-index stats --store ./store --json
    """
    from search.stats import store_stats
    from search.store import Store

    settings = settings_from(store=store, nprobe=nprobe, ef_search=ef_search)
    with Store(require_store(settings), readonly=True) as handle:
        data = store_stats(handle, settings, recall_sample=recall_sample).to_json()
    if as_json:
        emit(data)
    else:
        print_stats(data)


@click.command()
@store_option
@click.option("--index-factory", default=None, help="Change the FAISS factory while rebuilding (e.g. HNSW32).")
@verbose_option
@handle_errors
def rebuild(store: Path | None, index_factory: str | None, verbose: bool) -> None:
    """Rebuild the FAISS index files from SQLite (the source of truth).

    \b
    Example:
      nsfw-index rebuild --store ./store --index-factory HNSW32
    """
    import time

    from indexer.capture import capture_warnings
    from search.service import rebuild_indexes
    from search.store import Store

    settings = settings_from(store=store, index_factory=index_factory)
    with capture_warnings() as captured, Store.writing(require_store(settings), "nsfw-index rebuild") as handle:
        factory = index_factory or str(handle.get_info("index_factory", settings.index_factory))
        n = handle.count_images()
        captured.say(
            f"rebuilding the FAISS indexes over {n} images ({factory}; training an approximate index "
            "can take minutes) ..."
        )
        t0 = time.perf_counter()
        counts = rebuild_indexes(handle, settings, index_factory=index_factory)
        took = time.perf_counter() - t0
    click.echo(
        f"rebuilt in {took:.1f}s: {counts['all']} vectors in the index over all images, "
        f"{counts['unsafe']} known-unsafe",
        err=True,
    )
    print_warnings(captured.count, captured.lines, verbose=verbose)


@click.command()
@store_option
@click.option(
    "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Parquet file to write."
)
@click.option("--no-embeddings", is_flag=True, help="Leave the embedding column out.")
@handle_errors
def export(store: Path | None, out: Path, no_embeddings: bool) -> None:
    """Export ids, sha256, paths, scores, level, known-unsafe sources and embeddings to Parquet.

    \b
    Example:
      nsfw-index export --store ./store --out corpus.parquet
    """
    from search.export import export_parquet
    from search.store import Store

    settings = settings_from(store=store)
    with Store(require_store(settings), readonly=True) as handle:
        n = export_parquet(handle, out, settings, embeddings=not no_embeddings)
    click.echo(f"wrote {n} images to {out}", err=True)
