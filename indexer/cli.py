"""The `nsfw-index` command line: translates flags to Settings and errors to exit codes; logic lives elsewhere."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from search.errors import NsfwIndexError
from search.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED_ITEMS = 1  # some inputs failed, the rest were processed
EXIT_ERROR = 2  # nothing done: a usage, model or store problem


def _emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, allow_nan=False))


def handle_errors(fn: F) -> F:
    """NsfwIndexError -> one line on stderr and exit status 2: the message says how to fix it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NsfwIndexError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


def model_options(fn: F) -> F:
    opts = [
        click.option("--model", envvar="NSFW_INDEX_MODEL", default=None,
                     help="Hugging Face repo id (default Freepik/nsfw_image_detector), a directory with config.json + "
                          "model.safetensors, or a .safetensors file with --arch. Env NSFW_INDEX_MODEL."),
        click.option("--arch", default=None, help="timm architecture for a bare .safetensors file."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per forward pass."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default=None,
                     help="Default: fp32 on cpu, bf16 on cuda."),
        click.option("--threads", type=click.IntRange(1), default=None, help="torch intra-op threads."),
        click.option("--nsfw-level", type=click.Choice(["low", "medium", "high"]), default=None,
                     help="Score that decides is_nsfw (default medium)."),
        click.option("--nsfw-threshold", type=click.FloatRange(0, 1), default=None,
                     help="is_nsfw when the score at --nsfw-level reaches this (default 0.5)."),
        click.option("--max-pixels", type=click.IntRange(1), default=None, help="Refuse images with more pixels."),
        click.option("--max-file-bytes", type=click.IntRange(1), default=None, help="Refuse larger files unread."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def store_option(fn: F) -> F:
    return click.option(
        "--store", envvar="NSFW_INDEX_STORE", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Store directory. Env NSFW_INDEX_STORE.",
    )(fn)


def settings_from(**flags: Any) -> Settings:
    try:
        return Settings.from_flags(**flags)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise click.UsageError(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="nsfw-index")
def cli() -> None:
    """NSFW scores, nearest known-unsafe images, near-duplicates and clusters for an image corpus.

    \b
    Example:
      nsfw-index index ~/corpus --store ./store
      nsfw-index query upload.jpg --store ./store --json
    """


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per image.")
@click.option("--with-embedding", is_flag=True, help="Include the L2-normalised embedding (with --json).")
@handle_errors
def score(images: tuple[Path, ...], as_json: bool, with_embedding: bool, **flags: Any) -> None:
    """Score images with the NSFW classifier (no store needed).

    \b
    Example:
      nsfw-index score a.jpg b.png --json
    Exit status 1 if any image failed (its line has `path` and `error`), 2 if nothing could run.
    """
    from indexer.scoring import score_files

    settings = settings_from(**flags)
    failed = 0
    rows = []
    for path, result in score_files(images, settings):
        if isinstance(result, NsfwIndexError):
            failed += 1
            row: dict[str, Any] = {"path": str(path), "error": str(result)}
        else:
            row = {"path": str(path), **result.as_json(with_embedding)}
        if as_json:
            _emit(row)
        else:
            rows.append(row)
    if not as_json:
        _print_score_table(rows)
    if failed:
        sys.exit(EXIT_FAILED_ITEMS)


def _print_score_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("path", "level", "nsfw", "neutral", "low", "medium", "high")
    for r in rows:
        if "error" in r:
            table.add_row(r["path"], "[red]error[/red]", "", r["error"], "", "", "")
            continue
        s = r["scores"]
        table.add_row(r["path"], r["level"], "yes" if r["is_nsfw"] else "no",
                      *(f"{s[k]:.3f}" for k in ("neutral", "low", "medium", "high")))
    Console(soft_wrap=True).print(table)



@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@store_option
@model_options
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Decode processes (default: cores - 1; 0 decodes in the main process).")
@click.option("--prune", is_flag=True, help="Drop recorded paths under the inputs that no longer exist.")
@click.option("--rebuild", is_flag=True,
              help="Re-embed everything with this model (a store built with other weights is refused otherwise).")
@click.option("--all-files", is_flag=True, help="Try every file in directories, not only image extensions.")
@click.option("--index-factory", default=None,
              help="FAISS factory for the index over all images, e.g. Flat (default, exact), HNSW32, IVF4096,PQ64.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
@handle_errors
def index(inputs: tuple[str, ...], prune: bool, rebuild: bool, all_files: bool, index_factory: str | None,
          quiet: bool, as_json: bool, **flags: Any) -> None:
    """Index images into a store: directories (recursive), files, @list.txt files and .tar shards.

    \b
    Example:
      nsfw-index index ~/corpus @more.txt shard-0001.tar --store ./store
    Re-runs are incremental (unchanged files are skipped, content is keyed by sha256) and resumable after a crash.
    Exit status 0 even when some files failed (they are recorded with the reason); 1 if nothing could be indexed.
    """
    from indexer.service import index_inputs

    settings = settings_from(**flags)
    store_dir = require_store(settings)
    summary = index_inputs(store_dir, list(inputs), settings, prune=prune, rebuild=rebuild, all_files=all_files,
                           index_factory=index_factory, progress=not quiet)
    if as_json:
        _emit({"run_id": summary.run_id, **summary.counts(), "timings": summary.timings})
    elif not quiet:
        c = summary.counts()
        click.echo(
            f"run {summary.run_id}: {c['seen']} files seen, {c['new_images']} new images, "
            f"{c['duplicate_paths']} exact-duplicate paths, {c['unchanged']} unchanged, {c['errors']} errors"
            + (f", pruned {c['pruned_paths']} paths / {c['pruned_images']} images" if prune else ""),
            err=True,
        )
        click.echo("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.timings.items()), err=True)
        for key, reason in summary.error_samples[:10]:
            click.echo(f"  error: {key}: {reason}", err=True)
    if summary.errors and summary.indexed_paths == 0 and summary.unchanged == 0:
        sys.exit(EXIT_FAILED_ITEMS)


def require_store(settings: Settings) -> Path:
    if settings.store is None:
        raise click.UsageError("no store given: pass --store DIR or set NSFW_INDEX_STORE")
    return settings.store


@cli.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--recall-sample", type=click.IntRange(0), default=200,
              help="Queries used to measure recall@10 of an approximate index against exact search (0: skip).")
@handle_errors
def stats(store: Path | None, as_json: bool, recall_sample: int) -> None:
    """Counts, levels, known-unsafe, index freshness and the model identity of a store.

    \b
    Example:
      nsfw-index stats --store ./store --json
    """
    from search.stats import store_stats

    settings = settings_from(store=store)
    data = store_stats(require_store(settings), settings, recall_sample=recall_sample)
    if as_json:
        _emit(data)
        return
    _print_stats(data)


def _print_stats(d: dict[str, Any]) -> None:
    lines = [
        f"images: {d['images']}   paths: {d['paths']}   exact-duplicate images: {d['exact_duplicates']['images']}"
        f"   errors: {d['errors']}",
        "levels: " + ", ".join(f"{k} {v}" for k, v in d["levels"].items()),
        "known-unsafe: " + ", ".join(f"{k} {v}" for k, v in d["known_unsafe"].items()),
        f"model: {d['model'].get('architecture')} weights sha256 {str(d['model'].get('weights_sha256'))[:16]}…",
    ]
    for name, info in d["indexes"].items():
        if not info.get("exists"):
            lines.append(f"index {name}: missing (run `nsfw-index rebuild`)")
        else:
            lines.append(f"index {name}: {info['count']} vectors, {info['factory']}, generation {info['generation']}, "
                         + ("fresh" if info["fresh"] else f"stale ({', '.join(info['stale_because']) or 'behind'})"))
    if d.get("recall_at_10") is not None:
        lines.append(f"recall@10 of the approximate index vs exact: {d['recall_at_10']:.3f}")
    cl = d.get("clusters")
    if cl:
        lines.append(f"clusters: {cl.get('clusters')} semantic, {cl.get('groups')} near-duplicate groups "
                     f"(threshold {cl.get('threshold')}), {cl.get('flagged_clusters')} clusters and "
                     f"{cl.get('flagged_groups')} groups flagged" + ("" if cl.get("fresh") else "; stale: re-run cluster"))
    click.echo("\n".join(lines))


@cli.command()
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

    settings = settings_from(store=store, index_factory=index_factory)
    counts = rebuild_indexes(require_store(settings), settings, index_factory=index_factory)
    click.echo(f"rebuilt: {counts['all']} vectors in the index over all images, {counts['unsafe']} known-unsafe", err=True)


@cli.command()
@store_option
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Parquet file to write.")
@click.option("--no-embeddings", is_flag=True, help="Leave the embedding column out.")
@handle_errors
def export(store: Path | None, out: Path, no_embeddings: bool) -> None:
    """Export ids, sha256, paths, scores, level, known-unsafe sources and embeddings to Parquet.

    \b
    Example:
      nsfw-index export --store ./store --out corpus.parquet
    """
    from search.export import export_parquet

    settings = settings_from(store=store)
    n = export_parquet(require_store(settings), out, settings, embeddings=not no_embeddings)
    click.echo(f"wrote {n} images to {out}", err=True)


def main() -> None:
    cli(prog_name="nsfw-index")


if __name__ == "__main__":
    main()
