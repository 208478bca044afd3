"""Review from the terminal: `show` (one image), `neighbours` (its answer, no model run), `errors`, `clusters`."""

from __future__ import annotations

from pathlib import Path

import click

from indexer.cli.options import emit, handle_errors, json_option, require_store, settings_from, store_option
from indexer.cli.output import print_cluster, print_errors, print_image, print_neighbours
from search.errors import NotFound

SOURCES = click.Choice(["human", "hash_list", "model"])


@click.command()
@click.argument("ref")
@store_option
@json_option("The image as one JSON object (what GET /v1/images/{id} answers, paths included).")
@handle_errors
def show(ref: str, store: Path | None, as_json: bool) -> None:
    """One indexed image by id, path or sha256: scores, verdict, known-unsafe sources, PDQ, paths, label history.

    \b
    Example:
      nsfw-index show 17 --store ./store
      nsfw-index show /data/x.jpg --store ./store --json
    """
    from search.images import image_detail
    from search.store import Store

    settings = settings_from(store=store)
    with Store(require_store(settings), readonly=True) as handle:
        detail = image_detail(handle, handle.resolve_image(ref), settings)
    if as_json:
        emit(detail.to_json())
    else:
        print_image(detail)


@click.command()
@click.argument("ref")
@store_option
@click.option("-k", "k", type=click.IntRange(1, 1000), default=None, help="Nearest known-unsafe images (default 10).")
@click.option("--source", "sources", multiple=True, type=SOURCES, help="Only known-unsafe neighbours from these.")
@click.option("--min-similarity", type=click.FloatRange(-1, 1), default=None, help="Only neighbours this similar.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None, help="Near-duplicate threshold (0.90).")
@json_option("The answer as one JSON object (what GET /v1/images/{id}/neighbours answers, paths included).")
@handle_errors
def neighbours(
    ref: str,
    store: Path | None,
    k: int | None,
    sources: tuple[str, ...],
    min_similarity: float | None,
    threshold: float | None,
    as_json: bool,
) -> None:
    """An indexed image's nearest known-unsafe images, near-duplicates, exact duplicates and PDQ matches, from its
    stored embedding (no model run); the image itself is left out. REF is an id, a path or a sha256.

    \b
    Example:
      nsfw-index neighbours 17 --store ./store -k 5
    """
    from search.query import Searcher
    from search.store import Store

    settings = settings_from(store=store, k=k, near_duplicate_threshold=threshold)
    handle = Store(require_store(settings), readonly=True)
    searcher = Searcher(handle, settings)  # owns the handle
    try:
        image_id = handle.resolve_image(ref)
        ans = searcher.neighbours(
            image_id, k=k, sources=list(sources) or None, min_similarity=min_similarity, threshold=threshold
        )
        dup_paths = handle.paths_of([d.id for d in ans.near_duplicates])
    finally:
        searcher.close()
    if as_json:
        emit(ans.to_json())
    else:
        print_neighbours(ans, dup_paths)


@click.command()
@store_option
@click.option("--kind", "kinds", multiple=True, help="Only errors of this kind (repeatable), e.g. invalid, too_large.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many.")
@json_option("One JSON object per line per file.")
@handle_errors
def errors(store: Path | None, kinds: tuple[str, ...], limit: int | None, as_json: bool) -> None:
    """The files that failed to index, with the reason and kind (they are retried once they change).

    \b
    Example:
      nsfw-index errors --store ./store --kind too_large --json
    """
    from search.answers import FileError
    from search.store import Store

    settings = settings_from(store=store)
    with Store(require_store(settings), readonly=True) as handle:
        rows = [FileError(**r) for r in handle.errors(limit, kinds=kinds)]
        total = handle.count_errors(kinds=kinds)
        by_kind = handle.error_kinds()
    if as_json:
        for r in rows:
            emit(r.to_json())
    else:
        print_errors(rows, total, by_kind)


@click.command()
@store_option
@click.option("--groups", is_flag=True, help="Near-duplicate groups instead of k-means clusters.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="How many to list.")
@click.option("--flagged", is_flag=True, help="Only those holding known-unsafe images (most unsafe first).")
@click.option("--sort", type=click.Choice(["size", "unsafe"]), default=None, help="Biggest or most known-unsafe first.")
@click.option("--members", type=click.IntRange(0), default=5, show_default=True, help="Member paths listed per one.")
@json_option("One JSON object per line per cluster (its members with their paths).")
@handle_errors
def clusters(
    store: Path | None, groups: bool, top: int, flagged: bool, sort: str | None, members: int, as_json: bool
) -> None:
    """The clusters (or near-duplicate groups) of the last `nsfw-index cluster` run: size, known-unsafe count,
    representative and member paths.

    \b
    Example:
      nsfw-index clusters --store ./store --groups --flagged --top 20
    """
    from search.clusters import get_cluster, list_clusters
    from search.store import Store

    settings = settings_from(store=store)
    kind = "group" if groups else "cluster"
    order = sort or ("unsafe" if flagged else "size")
    with Store(require_store(settings), readonly=True) as handle:
        page = list_clusters(handle, settings, kind=kind, sort=order, per_page=min(top, 500))
        if page.clustering is None:
            raise NotFound(
                f"the store at {handle.root} has no clusters yet: run `nsfw-index cluster --store {handle.root}`"
            )
        items = [i for i in page.items if i.flagged or not flagged]
        details = []
        for item in items:
            d = get_cluster(handle, settings, item.id, limit=members)
            paths = handle.paths_of([m.id for m in d.members] + ([d.representative_id] if d.representative_id else []))
            for m in d.members:
                m.paths = paths.get(m.id, [])
            details.append((d, paths.get(d.representative_id or -1, [])))
    if not page.fresh:
        click.echo("note: images were added or removed since the clustering ran; re-run `nsfw-index cluster`", err=True)
    if as_json:
        for d, _ in details:
            emit(d.to_json())
        return
    what = "near-duplicate groups" if groups else "clusters"
    click.echo(
        f"{len(details)} of {page.total} {what}"
        + (" holding known-unsafe images" if flagged else "")
        + f", {'most known-unsafe' if order == 'unsafe' else 'biggest'} first"
    )
    for d, rep_paths in details:
        print_cluster(d, rep_paths)
