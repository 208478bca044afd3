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
    require_store,
    search_options,
    settings_from,
    store_option,
)
from indexer.cli.output import print_index_summary, print_stats


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
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@json_option("Print the run summary as one JSON object.")
@handle_errors
def index(
    inputs: tuple[str, ...],
    prune: bool,
    rebuild: bool,
    all_files: bool,
    index_factory: str | None,
    quiet: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Index images into a store: directories (recursive), files, @list.txt files and .tar shards.

    \b
    Example:
      nsfw-index index ~/corpus @more.txt shard-0001.tar --store ./store
    Re-runs are incremental (unchanged files are skipped, content is keyed by sha256) and resumable after a crash.
    Exit status 0 even when some files failed (they are recorded with the reason); 1 if nothing could be indexed.
    """
    from indexer.service import index_inputs
    from search.store import Store

    settings = settings_from(**flags)
    with Store.writing(require_store(settings), "nsfw-index index", create=True) as store:
        summary = index_inputs(
            store,
            list(inputs),
            settings,
            prune=prune,
            rebuild=rebuild,
            all_files=all_files,
            index_factory=index_factory,
            progress=not quiet,
        )
    if as_json:
        emit({"run_id": summary.run_id, **summary.counts(), "timings": summary.timings})
    elif not quiet:
        print_index_summary(summary, pruned=prune)
    if summary.errors and summary.indexed_paths == 0 and summary.unchanged == 0:
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
@handle_errors
def rebuild(store: Path | None, index_factory: str | None) -> None:
    """Rebuild the FAISS index files from SQLite (the source of truth).

    \b
    Example:
      nsfw-index rebuild --store ./store --index-factory HNSW32
    """
    from search.service import rebuild_indexes
    from search.store import Store

    settings = settings_from(store=store, index_factory=index_factory)
    with Store.writing(require_store(settings), "nsfw-index rebuild") as handle:
        counts = rebuild_indexes(handle, settings, index_factory=index_factory)
    click.echo(
        f"rebuilt: {counts['all']} vectors in the index over all images, {counts['unsafe']} known-unsafe", err=True
    )


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
