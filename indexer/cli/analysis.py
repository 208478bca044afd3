"""The verbs that run the model on files: `score` (no store) and `query` (against a store)."""

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
)
from indexer.cli.output import print_query, print_score_table
from search.errors import InvalidImage
from search.settings import Settings

ALL_FILES = click.option("--all-files", is_flag=True, help="Try every file in directories, not only image extensions.")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@model_options
@ALL_FILES
@json_option("One JSON object per line per image.")
@click.option("--with-embedding", is_flag=True, help="Include the L2-normalised embedding (with --json).")
@click.option(
    "--probe",
    "probe_names",
    multiple=True,
    metavar="NAME",
    help="Also apply the store's probe NAME (repeatable; needs --store): adds `probes: {NAME: {class: p}}`.",
)
@store_option
@handle_errors
def score(
    inputs: tuple[str, ...],
    all_files: bool,
    as_json: bool,
    with_embedding: bool,
    probe_names: tuple[str, ...],
    **flags: Any,
) -> None:
    """Score images with the NSFW classifier (no store needed): files, directories, @list.txt and .tar shards, as
    `index` takes them.

    \b
    Example:
      nsfw-index score a.jpg b.png ~/folder shard.tar --json
      nsfw-index score a.jpg --probe unsafe-v2 --store ./store --json
    Exit status 1 if any image failed (its line has `path` and `error`), 2 if nothing could run.
    """
    settings = settings_from(**flags)
    preflight_model(settings)  # a missing model fails before torch is even imported
    from indexer.files import score_inputs

    extractor, probes = None, []
    if probe_names:
        from indexer.extractor import Extractor
        from search.probes import load_probes, probe_outputs
        from search.store import Store

        with Store(require_store(settings), readonly=True) as handle:
            probes = load_probes(handle, probe_names, check_model=False)  # NotFound before the model loads
        extractor = Extractor.from_settings(settings)
        for p in probes:  # ModelMismatch before any file is read
            p.require_model(extractor.identity, "the model in use")
    failed = 0
    rows = []
    for path, result in score_inputs(inputs, settings, extractor, all_files=all_files):
        if isinstance(result, InvalidImage):
            failed += 1
            row: dict[str, Any] = {"path": str(path), "error": str(result)}
        else:
            row = {"path": str(path), **result.nsfw().to_json()}
            if with_embedding:
                row["embedding"] = result.embedding_json()
            if probes:
                row["probes"] = probe_outputs(probes, result.embedding.reshape(1, -1))[0]
        if as_json:
            emit(row)
        else:
            rows.append(row)
    if not as_json:
        print_score_table(rows)
        for r in rows:
            if r.get("probes"):
                outs = "; ".join(
                    f"{n}: " + ", ".join(f"{k} {v:.3f}" for k, v in o.items()) for n, o in r["probes"].items()
                )
                click.echo(f"{r['path']}: {outs}")
    if failed:
        sys.exit(EXIT_FAILED_ITEMS)


@click.command()
@click.argument("inputs", nargs=-1)
@store_option
@model_options
@click.option(
    "--embedding",
    "embedding_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Query with the vector(s) in FILE.npy instead of images (one vector, or one per row): no model run.",
)
@click.option("-k", "k", type=click.IntRange(1, 1000), default=None, help="Nearest known-unsafe images (default 10).")
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Choice(["human", "hash_list", "model"]),
    help="Only known-unsafe neighbours from these sources (repeatable).",
)
@click.option(
    "--min-similarity",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Only known-unsafe neighbours at least this similar.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Near-duplicate cosine similarity threshold (default 0.90).",
)
@click.option(
    "--pdq-max-distance",
    type=click.IntRange(0, 256),
    default=None,
    help="PDQ Hamming distance that counts as a match (default 31).",
)
@search_options
@ALL_FILES
@json_option("One JSON object per line per image.")
@handle_errors
def query(
    inputs: tuple[str, ...],
    all_files: bool,
    k: int | None,
    sources: tuple[str, ...],
    min_similarity: float | None,
    threshold: float | None,
    as_json: bool,
    embedding_file: str | None,
    **flags: Any,
) -> None:
    """Score images and find their nearest known-unsafe images, near-duplicates and PDQ matches in a store (files,
    directories, @list.txt and .tar shards). An image already indexed is left out of its own answer; its other
    copies are listed as exact duplicates. With --embedding FILE.npy the query is a vector of the store model's
    dimension (L2-normalised first; no model run): the answer has nearest_unsafe and near_duplicates only.

    \b
    Example:
      nsfw-index query upload.jpg --store ./store -k 5 --source human --json
      nsfw-index query --embedding vec.npy --store ./store --json
    Exit status 1 if any image failed (its line has `path` and `error`).
    """
    from search.query import Searcher
    from search.store import Store

    settings = settings_from(**flags, k=k, near_duplicate_threshold=threshold)
    store_dir = require_store(settings)
    if bool(inputs) == bool(embedding_file):
        raise click.UsageError("give images to query, or --embedding FILE.npy (not both)")
    if embedding_file:
        _query_embeddings(embedding_file, store_dir, settings, list(sources) or None, min_similarity, as_json)
        return
    preflight_model(settings)  # a missing model fails before torch is even imported
    from indexer.files import query_inputs

    failed = 0
    with Store(store_dir, readonly=True) as store:
        searcher = Searcher(store, settings)
        try:
            answers = query_inputs(
                inputs,
                searcher,
                settings,
                all_files=all_files,
                k=settings.k,
                sources=list(sources) or None,
                min_similarity=min_similarity,
            )
            for path, ans in answers:
                if isinstance(ans, InvalidImage):
                    failed += 1
                    if as_json:
                        emit({"path": str(path), "error": str(ans)})
                    else:
                        print_query(str(path), None, str(ans))
                elif as_json:
                    emit({"path": str(path), **ans.to_json()})
                else:
                    print_query(str(path), ans, paths=store.paths_of([d.id for d in ans.near_duplicates]))
        finally:
            searcher.close()
    if failed:
        sys.exit(EXIT_FAILED_ITEMS)


def _query_embeddings(
    file: str,
    store_dir: Path,
    settings: Settings,
    sources: list[str] | None,
    min_similarity: float | None,
    as_json: bool,
) -> None:
    """`query --embedding FILE.npy`: each vector against the store (checked against the store's model)."""
    from indexer.query_forms import load_embeddings
    from search.query import Searcher
    from search.store import Store

    vectors = load_embeddings(file)
    with Store(store_dir, readonly=True) as store:
        searcher = Searcher(store, settings)
        for row, vec in enumerate(vectors):
            ans = searcher.embedding_answer(vec, k=settings.k, sources=sources, min_similarity=min_similarity)
            if as_json:
                emit({"path": file, "row": row, **ans.to_json()})
                continue
            click.echo(f"{file}[{row}]: embedding query (no model run)")
            for nb in ans.nearest_unsafe:
                click.echo(f"  unsafe   id {nb.id:>6}  sim {nb.similarity:.3f}  {nb.level:<7} {'+'.join(nb.sources)}")
            paths = store.paths_of([d.id for d in ans.near_duplicates])
            for dup in ans.near_duplicates:
                click.echo(f"  near-dup id {dup.id:>6}  sim {dup.similarity:.3f}  {', '.join(paths[dup.id][:2])}")
