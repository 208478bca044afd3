"""The verbs that build and maintain a store: `index`, `rebuild`, `stats`, `export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from indexer.ray_cluster import RayOptions


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
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on Ray Data: alone, a new local Ray instance; `auto` (the cluster `ray start` runs here), HOST:PORT or "
    "ray://HOST:10001. Every node must see the inputs at the same paths. Needs pip install 'nsfw-index[ray]'.",
)
@click.option(
    "--ray-workers",
    type=click.IntRange(1),
    default=None,
    help="With --ray: inference actors (default: one per GPU share; on CPUs from 1 up to half the CPUs' worth).",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(0),
    default=None,
    help="With --ray: GPUs per inference actor (1, or 0.5 to share one); default 0: CPU actors, --backend/--dtype.",
)
@click.option(
    "--ray-shard-size",
    type=click.IntRange(1),
    default=None,
    help="With --ray: new images per result shard (default 1024); a killed run resumes from its finished shards.",
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
    ray_address: str | None,
    ray_workers: int | None,
    gpus_per_worker: float | None,
    ray_shard_size: int | None,
    quiet: bool,
    verbose: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Index images into a store: directories (recursive), files, @list.txt files and .tar shards.

    \b
    Example:
      nsfw-index index ~/corpus @more.txt shard-0001.tar --store ./store
      nsfw-index index /shared/corpus --store ./store --ray auto --gpus-per-worker 1
    Re-runs are incremental (unchanged files are skipped, content is keyed by sha256) and resumable after a crash;
    files that failed are remembered too and tried again once they change (or with --retry-errors).
    Exit status 0 when every input is indexed (or unchanged), 1 when some files are in error (they are recorded
    with the reason: `nsfw-index errors --store DIR`), 2 when nothing could be done (usage, model or store problem).
    """
    settings = settings_from(**flags)
    store_dir = require_store(settings)
    preflight_model(settings)  # a missing model fails before torch is even imported
    ray_options = _ray_options(ray_address, ray_workers, gpus_per_worker, ray_shard_size, flags.get("workers"))
    from indexer.capture import capture_warnings
    from indexer.service import index_inputs
    from indexer.summary import Progress
    from search.store import Store

    with (
        capture_warnings() as captured,
        Store.writing(store_dir, "nsfw-index index", create=True) as store,
    ):
        run: dict[str, Any] = {
            "prune": prune,
            "rebuild": rebuild,
            "all_files": all_files,
            "index_factory": index_factory,
            "progress": Progress(not quiet, file=captured.stream),
            "thumbnails": thumbnails,
            "retry_errors": retry_errors,
        }
        ray_report = None
        if ray_options is None:
            summary = index_inputs(store, list(inputs), settings, **run)
        else:
            from indexer.ray_index import index_inputs_ray

            summary, ray_report = index_inputs_ray(store, list(inputs), settings, ray_options, **run)
    summary.warnings = captured.lines
    if as_json:
        emit(
            {
                "run_id": summary.run_id,
                **summary.counts(),
                "warnings": captured.count,
                "timings": summary.timings,
                "startup": summary.startup,
                "model_share": summary.model_share,
                "engine": summary.engine,
                **({"ray": ray_report.to_json()} if ray_report is not None else {}),
            }
        )
    elif not quiet:
        print_index_summary(summary, pruned=prune, store=store_dir, warnings=captured.count, verbose=verbose)
        if ray_report is not None:
            r = ray_report
            click.echo(
                f"ray ({r.address}): {r.nodes} node(s), {r.cpus:g} CPUs, {r.gpus:g} GPUs; inference workers "
                f"{r.inference_workers or '-'}; {r.shards_written} shard(s) computed, {r.shards_reused} reused",
                err=True,
            )
            for d in r.unfinished_runs:
                click.echo(f"  unfinished Ray run kept for resuming: {d} (delete it if not needed)", err=True)
    if summary.failed:
        sys.exit(EXIT_FAILED_ITEMS)


def _ray_options(
    address: str | None, workers: int | None, gpus: float | None, shard_size: int | None, decoders: int | None
) -> RayOptions | None:
    """`--ray` and its flags -> RayOptions (checked, Ray importable), or None without --ray."""
    if address is None:
        if workers is not None or gpus is not None or shard_size is not None:
            raise click.UsageError("--ray-workers, --gpus-per-worker and --ray-shard-size go with --ray")
        return None
    if decoders is not None:
        raise click.UsageError("--workers sets local decode processes; with --ray, Ray tasks decode (one per free CPU)")
    from indexer.ray_cluster import RayOptions, require_ray

    options = RayOptions(address=address, workers=workers, gpus_per_worker=gpus or 0.0, shard_size=shard_size or 1024)
    options.check()
    require_ray()
    return options


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
@click.option(
    "--on-disk/--in-memory",
    "on_disk",
    default=None,
    help="Keep the inverted lists of an IVF index in an .ivfdata file, memory-mapped by readers (100M+ images), or "
    "back in memory (default: as the store has it).",
)
@verbose_option
@handle_errors
def rebuild(store: Path | None, index_factory: str | None, on_disk: bool | None, verbose: bool) -> None:
    """Rebuild the FAISS index files from SQLite (the source of truth).

    \b
    Example:
      nsfw-index rebuild --store ./store --index-factory HNSW32
      nsfw-index rebuild --store ./store --index-factory IVF65536_HNSW32,PQ64 --on-disk
    A factory FAISS refuses, or one that fails to train, changes nothing: the old files keep serving.
    """
    import time

    from indexer.capture import capture_warnings
    from search.service import rebuild_indexes
    from search.store import Store

    settings = settings_from(store=store, index_factory=index_factory)
    with capture_warnings() as captured, Store.writing(require_store(settings), "nsfw-index rebuild") as handle:
        factory = index_factory or str(handle.get_info("index_factory", settings.index_factory))
        placed = on_disk if on_disk is not None else bool(handle.get_info("index_on_disk", False))
        n = handle.count_images()
        captured.say(
            f"rebuilding the FAISS indexes over {n} images ({factory}{', lists on disk' if placed else ''}; "
            "training an approximate index can take minutes) ..."
        )
        t0 = time.perf_counter()
        counts = rebuild_indexes(handle, settings, index_factory=index_factory, on_disk=on_disk)
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
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write: CSV when it ends in .csv, else Parquet (or say --format).",
)
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default=None, help="Overrides the extension.")
@click.option(
    "--columns",
    multiple=True,
    help="Comma-separated columns, in order (repeatable): id, sha256, paths, level, score_<level>, prob_<level>, "
    "known_unsafe_sources, label, pdq, pdq_quality, width, height, probe.NAME.CLASS, embedding; groups: scores, "
    "probabilities, probes, probe.NAME. Default: all but embedding, which Parquet adds.",
)
@click.option(
    "--embeddings/--no-embeddings",
    default=None,
    help="Add or leave out the embedding column (default: in Parquet, not in CSV).",
)
@handle_errors
def export(store: Path | None, out: Path, fmt: str | None, columns: tuple[str, ...], embeddings: bool | None) -> None:
    """Export ids, sha256, paths, scores, level, known-unsafe sources, labels, PDQ, probe outputs and embeddings to
    Parquet or CSV (lists as JSON text in CSV cells; each probe class a column `probe.NAME.CLASS`).

    \b
    Example:
      nsfw-index export --store ./store --out corpus.parquet
      nsfw-index export --store ./store --out flagged.csv --columns id,sha256,paths,score_medium,probes
    An unknown column is refused with the list of valid ones, and nothing is written.
    """
    from search.export import export_store
    from search.store import Store

    settings = settings_from(store=store)
    names = [c.strip() for spec in columns for c in spec.split(",") if c.strip()]
    with Store(require_store(settings), readonly=True) as handle:
        n = export_store(handle, out, settings, fmt=fmt, columns=names or None, embeddings=embeddings)
    click.echo(f"wrote {n} images to {out}", err=True)
