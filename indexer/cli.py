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
        except KeyboardInterrupt:
            click.echo("interrupted: what was committed is kept; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def model_options(fn: F) -> F:
    opts = [
        click.option(
            "--model",
            envvar="NSFW_INDEX_MODEL",
            default=None,
            help="Hugging Face repo id (default Freepik/nsfw_image_detector), a directory with config.json + "
            "model.safetensors, or a .safetensors file with --arch. Env NSFW_INDEX_MODEL.",
        ),
        click.option("--arch", default=None, help="timm architecture for a bare .safetensors file."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per forward pass."),
        click.option(
            "--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available."
        ),
        click.option(
            "--dtype", type=click.Choice(["fp32", "bf16"]), default=None, help="Default: fp32 on cpu, bf16 on cuda."
        ),
        click.option("--threads", type=click.IntRange(1), default=None, help="torch intra-op threads."),
        click.option(
            "--nsfw-level",
            type=click.Choice(["low", "medium", "high"]),
            default=None,
            help="Score that decides is_nsfw (default medium).",
        ),
        click.option(
            "--nsfw-threshold",
            type=click.FloatRange(0, 1),
            default=None,
            help="is_nsfw when the score at --nsfw-level reaches this (default 0.5).",
        ),
        click.option("--max-pixels", type=click.IntRange(1), default=None, help="Refuse images with more pixels."),
        click.option("--max-file-bytes", type=click.IntRange(1), default=None, help="Refuse larger files unread."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def search_options(fn: F) -> F:
    """Search-time knobs of an approximate index (ignored by the exact default)."""
    fn = click.option(
        "--ef-search",
        type=click.IntRange(1),
        default=None,
        help="HNSW efSearch (default max(64, the index's)). Env NSFW_INDEX_EF_SEARCH.",
    )(fn)
    return click.option(
        "--nprobe",
        type=click.IntRange(1),
        default=None,
        help="IVF lists probed per query (default 16). Env NSFW_INDEX_NPROBE.",
    )(fn)


def store_option(fn: F) -> F:
    return click.option(
        "--store",
        envvar="NSFW_INDEX_STORE",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
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

    table = Table("level", "nsfw", "neutral", "low", "medium", "high")
    table.add_column("path", overflow="fold")  # last, and never cut: users copy paths out of this table
    for r in rows:
        if "error" in r:
            table.add_row("[red]error[/red]", "", "", "", "", "", f"{r['path']}: {r['error']}")
            continue
        s = r["scores"]
        table.add_row(
            r["level"],
            "yes" if r["is_nsfw"] else "no",
            *(f"{s[k]:.3f}" for k in ("neutral", "low", "medium", "high")),
            r["path"],
        )
    console = Console()
    if not console.is_terminal:  # piped: wide enough that no path is folded
        console = Console(width=max(100, 60 + max((len(r["path"]) + len(r.get("error", "")) for r in rows), default=0)))
    console.print(table)


@cli.command()
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
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
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

    settings = settings_from(**flags)
    store_dir = require_store(settings)
    summary = index_inputs(
        store_dir,
        list(inputs),
        settings,
        prune=prune,
        rebuild=rebuild,
        all_files=all_files,
        index_factory=index_factory,
        progress=not quiet,
    )
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
@search_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
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

    settings = settings_from(store=store, nprobe=nprobe, ef_search=ef_search)
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
            lines.append(
                f"index {name}: {info['count']} vectors, {info['factory']}, generation {info['generation']}, "
                + ("fresh" if info["fresh"] else f"stale ({', '.join(info['stale_because']) or 'behind'})")
            )
    if d.get("recall_at_10") is not None:
        lines.append(f"recall@10 of the approximate index vs exact: {d['recall_at_10']:.3f}")
    cl = d.get("clusters")
    if cl:
        lines.append(
            f"clusters: {cl.get('clusters')} semantic, {cl.get('groups')} near-duplicate groups "
            f"(threshold {cl.get('threshold')}), {cl.get('flagged_clusters')} clusters and "
            f"{cl.get('flagged_groups')} groups flagged" + ("" if cl.get("fresh") else "; stale: re-run cluster")
        )
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
    click.echo(
        f"rebuilt: {counts['all']} vectors in the index over all images, {counts['unsafe']} known-unsafe", err=True
    )


@cli.command()
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

    settings = settings_from(store=store)
    n = export_parquet(require_store(settings), out, settings, embeddings=not no_embeddings)
    click.echo(f"wrote {n} images to {out}", err=True)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@store_option
@model_options
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
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per image.")
@handle_errors
def query(
    images: tuple[Path, ...],
    k: int | None,
    sources: tuple[str, ...],
    min_similarity: float | None,
    threshold: float | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Score images and find their nearest known-unsafe images, near-duplicates and PDQ matches in a store.

    \b
    Example:
      nsfw-index query upload.jpg --store ./store -k 5 --source human --json
    Exit status 1 if any image failed (its line has `path` and `error`).
    """
    from indexer.analyze import analyze, query_answer
    from indexer.extractor import Extractor
    from search.query import Searcher

    settings = settings_from(**flags, k=k, near_duplicate_threshold=threshold)
    searcher = Searcher(require_store(settings), settings)
    try:
        ex = Extractor.from_settings(settings)
        _check_query_model(searcher, ex)
        failed = 0
        paths = list(images)
        for i in range(0, len(paths), settings.batch_size):
            chunk = paths[i : i + settings.batch_size]
            items = []
            for p in chunk:
                try:
                    from indexer.decode import read_image_file

                    data, _ = read_image_file(p, max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels)
                    items.append((str(p), data))
                except NsfwIndexError as e:
                    items.append((str(p), e))  # type: ignore[arg-type]
            good = [(n, d) for n, d in items if isinstance(d, bytes)]
            analysed = iter(analyze(ex, good, settings))
            for name, d in items:
                a = d if not isinstance(d, bytes) else next(analysed)
                if isinstance(a, NsfwIndexError):
                    failed += 1
                    row: dict[str, Any] = {"path": name, "error": str(a)}
                else:
                    row = {
                        "path": name,
                        **query_answer(
                            a, searcher, k=settings.k, sources=list(sources) or None, min_similarity=min_similarity
                        ),
                    }
                if as_json:
                    _emit(row)
                else:
                    _print_query(row)
    finally:
        searcher.close()
    if failed:
        sys.exit(EXIT_FAILED_ITEMS)


def _check_query_model(searcher: Any, ex: Any) -> None:
    from search.errors import ModelMismatch

    stored = searcher.store.model_identity()
    if stored and stored.get("weights_sha256") != ex.identity.weights_sha256:
        raise ModelMismatch(
            f"the store was built with weights {str(stored.get('weights_sha256'))[:12]}…, the model in use has "
            f"{ex.identity.weights_sha256[:12]}…: similarities across models mean nothing. Use the store's --model."
        )


def _print_query(row: dict[str, Any]) -> None:
    if "error" in row:
        click.echo(f"{row['path']}: error: {row['error']}")
        return
    n = row["nsfw"]
    click.echo(
        f"{row['path']}: {n['level']} (medium {n['scores']['medium']:.3f}, high {n['scores']['high']:.3f})"
        f"{' NSFW' if n['is_nsfw'] else ''}"
        + (f"  [indexed as id {row['indexed_id']}]" if row.get("indexed_id") else "")
    )
    for nb in row["nearest_unsafe"]:
        click.echo(
            f"  unsafe  id {nb['id']:>7}  sim {nb['similarity']:.3f}  {nb['level']:<7} "
            f"{'+'.join(nb['sources']):<22} {nb['paths'][0] if nb['paths'] else ''}"
        )
    for nb in row["near_duplicates"]:
        click.echo(f"  near-dup id {nb['id']:>6}  sim {nb['similarity']:.3f}")
    pdq = row["pdq"]
    click.echo(f"  pdq {pdq['hash']} quality {pdq['quality']}, {len(pdq['matches'])} match(es)")
    for m in pdq["matches"]:
        what = f"list {m['list']}" if m["source"] == "hash_list" else f"labelled id {m['id']}"
        click.echo(f"    pdq match: {what} distance {m['distance']}")


@cli.command()
@click.argument("refs", nargs=-1)
@store_option
@click.option("--unsafe", "label", flag_value="unsafe", help="Mark as known-unsafe.")
@click.option("--safe", "label", flag_value="safe", help="Mark as safe (overrides the model and hash lists).")
@click.option("--clear", "label", flag_value="clear", help="Withdraw the human label.")
@click.option("--reason", default=None, help="Why (kept in the label log).")
@click.option("--who", default=None, help="Who labels (default: the login name).")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CSV with a column id/sha256/path and optional label and reason columns.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per label event.")
@handle_errors
def label(
    refs: tuple[str, ...],
    store: Path | None,
    label: str | None,
    reason: str | None,
    who: str | None,
    from_file: str | None,
    as_json: bool,
) -> None:
    """Label images unsafe/safe (or clear the label) by id, path or sha256; appends to the label log.

    \b
    Example:
      nsfw-index label --store ./store --unsafe 17 /data/x.jpg --reason "removed, ticket 123"
    """
    from search.labels import label_images

    settings = settings_from(store=store)
    if label is None and not from_file:
        raise click.UsageError("say --unsafe, --safe or --clear")
    events = label_images(
        require_store(settings), list(refs), label, settings, who=who, reason=reason, from_file=from_file
    )
    for e in events:
        if as_json:
            _emit(e)
        else:
            click.echo(f"id {e['id']}: {e['label']} (event {e['event']})")


@cli.command("import-hashes")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@store_option
@click.option("--name", required=True, help="Name of the hash list (importing again adds to it).")
@click.option("--replace", is_flag=True, help="Replace the list of that name instead of adding to it.")
@click.option(
    "--pdq-max-distance",
    type=click.IntRange(0, 256),
    default=None,
    help="Hamming distance that counts as a match (default 31).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@handle_errors
def import_hashes(
    file: str, store: Path | None, name: str, replace: bool, pdq_max_distance: int | None, as_json: bool
) -> None:
    """Import a PDQ hash list (one hex hash a line, or CSV with a `hash` column) and match the store against it.

    \b
    Example:
      nsfw-index import-hashes removed.csv --name removed-2026 --store ./store
    """
    from search.labels import import_hash_list

    settings = settings_from(store=store, pdq_max_distance=pdq_max_distance)
    out = import_hash_list(require_store(settings), file, name, settings, replace=replace)
    if as_json:
        _emit(out)
        return
    click.echo(
        f"list {out['list']}: {out['hashes']} hashes ({out['imported']} in this file), "
        f"{len(out['bad_lines'])} bad lines, {out['matched_images']} indexed images match",
        err=True,
    )
    for b in out["bad_lines"][:20]:
        click.echo(f"  line {b['line']}: {b['reason']}: {b['text'][:80]}", err=True)


@cli.command()
@store_option
@click.option(
    "--threshold",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Cosine similarity that links two images into one near-duplicate group (default 0.90).",
)
@click.option(
    "--clusters",
    "n_clusters",
    type=click.IntRange(1),
    default=None,
    help="Number of k-means clusters (default: about sqrt(N/2), at most 4096).",
)
@click.option("--force", is_flag=True, help="Recompute even if nothing changed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@handle_errors
def cluster(store: Path | None, threshold: float | None, n_clusters: int | None, force: bool, as_json: bool) -> None:
    """Compute near-duplicate groups and k-means clusters, flagging those that hold known-unsafe images.

    \b
    Example:
      nsfw-index cluster --store ./store --threshold 0.92 --clusters 200
    """
    from search.clusters import run_clustering

    settings = settings_from(store=store, near_duplicate_threshold=threshold)
    out = run_clustering(
        require_store(settings),
        settings,
        threshold=threshold,
        n_clusters=n_clusters,
        force=force,
        log=lambda msg: click.echo(msg, err=True),
    )
    if as_json:
        _emit(out)
    else:
        click.echo(
            f"{out['groups']} near-duplicate groups (threshold {out['threshold']}), {out['clusters']} clusters;"
            f" {out['flagged_groups']} groups and {out['flagged_clusters']} clusters hold known-unsafe images",
            err=True,
        )


@cli.command()
@store_option
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free).")
@click.option(
    "--api-keys",
    default=None,
    help="KEY:right+right,... with rights read, write, label, read_paths. Env NSFW_INDEX_API_KEYS.",
)
@click.option("--read-requires-key", is_flag=True, default=None, help="Close the read routes to callers without a key.")
@handle_errors
def serve(host: str, port: int, **flags: Any) -> None:
    """Serve the HTTP API (FastAPI under uvicorn; OpenAPI at /openapi.json, routes under /v1).

    \b
    Example:
      NSFW_INDEX_API_KEYS=s3cret:read+write+label nsfw-index serve --store ./store --port 8000
    """
    from api.server import run_server

    settings = settings_from(**flags)
    require_store(settings)
    run_server(settings, host=host, port=port)


def main() -> None:
    cli(prog_name="nsfw-index")


if __name__ == "__main__":
    main()
