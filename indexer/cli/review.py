"""The verbs of review work on a store: `label`, `import-hashes` (the inputs of known-unsafe) and `cluster`."""

from __future__ import annotations

from pathlib import Path

import click

from indexer.cli.options import emit, handle_errors, json_option, require_store, settings_from, store_option
from indexer.cli.output import print_clustering, print_import, print_label


@click.command()
@click.argument("refs", nargs=-1)
@store_option
@click.option("--unsafe", is_flag=True, help="Mark as known-unsafe.")
@click.option(
    "--safe",
    is_flag=True,
    help="Mark as safe: overrides the model's verdict only; a hash-list match still counts "
    "(see --override-hash-lists).",
)
@click.option("--clear", is_flag=True, help="Withdraw the human label (the model and hash lists count again).")
@click.option(
    "--override-hash-lists",
    is_flag=True,
    help="With --safe and a --reason: also override the images' hash-list matches (recorded in the label log; "
    "the matches stay listed in answers). A later label event ends the override.",
)
@click.option("--reason", default=None, help="Why (kept in the label log; required with --override-hash-lists).")
@click.option("--who", default=None, help="Who labels (default: the login name).")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CSV with a column id/sha256/path and optional label and reason columns.",
)
@json_option("One JSON object per label event.")
@handle_errors
def label(
    refs: tuple[str, ...],
    store: Path | None,
    unsafe: bool,
    safe: bool,
    clear: bool,
    override_hash_lists: bool,
    reason: str | None,
    who: str | None,
    from_file: str | None,
    as_json: bool,
) -> None:
    """Label images unsafe/safe (or clear the label) by id, path or sha256; appends to the label log.

    A human `safe` overrides the model only: an image that matches an imported hash list stays known-unsafe
    (source hash_list) until the match is overridden explicitly with --safe --override-hash-lists --reason.

    \b
    Example:
      nsfw-index label --store ./store --unsafe 17 /data/x.jpg --reason "removed, ticket 123"
      nsfw-index label --store ./store --safe 42 --override-hash-lists --reason "list false positive, ticket 9"
    """
    from search.labels import label_images
    from search.store import Store

    chosen = [name for name, on in (("unsafe", unsafe), ("safe", safe), ("clear", clear)) if on]
    if len(chosen) > 1:
        raise click.UsageError(f"give one of --unsafe, --safe, --clear, not {' and '.join('--' + c for c in chosen)}")
    if override_hash_lists and not safe:
        raise click.UsageError("--override-hash-lists goes with --safe only")
    if override_hash_lists and not from_file and not (reason and reason.strip()):
        raise click.UsageError("--override-hash-lists needs a --reason (kept in the label log)")
    if not chosen and not from_file:
        raise click.UsageError("say --unsafe, --safe or --clear")
    settings = settings_from(store=store)
    # writable, without the writer lock: labels are appended while an index run goes on
    with Store(require_store(settings)) as handle:
        events = label_images(
            handle,
            list(refs),
            chosen[0] if chosen else None,
            settings,
            who=who,
            reason=reason,
            from_file=from_file,
            override_hash_lists=override_hash_lists,
        )
    for e in events:
        if as_json:
            emit(e.to_json())
        else:
            print_label(e)


@click.command("import-hashes")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@store_option
@click.option("--name", required=True, help="Name of the hash list (importing again adds to it).")
@click.option("--replace", is_flag=True, help="Replace the list of that name instead of adding to it.")
@click.option("--who", default=None, help="Who imports (recorded with the list; default: the login name).")
@click.option(
    "--pdq-max-distance",
    type=click.IntRange(0, 256),
    default=None,
    help="Hamming distance that counts as a match (default 31).",
)
@json_option()
@handle_errors
def import_hashes(
    file: str,
    store: Path | None,
    name: str,
    replace: bool,
    who: str | None,
    pdq_max_distance: int | None,
    as_json: bool,
) -> None:
    """Import a PDQ hash list (one hex hash a line, or CSV with a `hash` column and optionally a `note` column) and
    match the store against it: every image's PDQ hash and its 8 dihedral hashes (rotations, mirrors). Manage the
    lists with `nsfw-index hash-lists`.

    \b
    Example:
      nsfw-index import-hashes removed.csv --name removed-2026 --store ./store
    """
    from search.labels import import_hash_list
    from search.pdq import read_hash_list_file
    from search.store import Store

    settings = settings_from(store=store, pdq_max_distance=pdq_max_distance)
    lines = read_hash_list_file(file)
    # writable, without the writer lock (as labels); a list may come before any image, so the store may be created
    with Store(require_store(settings), create=True) as handle:
        out = import_hash_list(
            handle, lines, name, settings, replace=replace, source=str(Path(file).resolve()), who=who
        )
    if as_json:
        emit(out.to_json())
    else:
        print_import(out)


@click.command()
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
@click.option("--verbose", "-v", is_flag=True, help="Show the library warnings captured during the run.")
@json_option("Print the summary as one JSON object.")
@handle_errors
def cluster(
    store: Path | None, threshold: float | None, n_clusters: int | None, force: bool, verbose: bool, as_json: bool
) -> None:
    """Compute near-duplicate groups and k-means clusters, flagging those that hold known-unsafe images.

    \b
    Example:
      nsfw-index cluster --store ./store --threshold 0.92 --clusters 200
    """
    from indexer.capture import capture_warnings
    from indexer.cli.output import print_warnings
    from search.clusters import run_clustering
    from search.store import Store

    settings = settings_from(store=store, near_duplicate_threshold=threshold)
    # each stage says when it is done (on the real stderr); FAISS k-means warnings are captured and counted
    with capture_warnings() as captured, Store.writing(require_store(settings), "nsfw-index cluster") as handle:
        captured.say(f"clustering {handle.count_images()} images ...")
        out = run_clustering(
            handle,
            settings,
            threshold=threshold,
            n_clusters=n_clusters,
            force=force,
            log=captured.say,
        )
    if as_json:
        emit(out.to_json())
    else:
        print_clustering(out)
    print_warnings(captured.count, captured.lines, verbose=verbose)
