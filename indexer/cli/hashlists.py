"""The `hash-lists` verb: imported PDQ hash lists as banks (`list`, `show NAME`, `export NAME`, `delete NAME`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from indexer.cli.options import emit, handle_errors, json_option, require_store, settings_from, store_option

DISTANCE = click.option(
    "--pdq-max-distance",
    type=click.IntRange(0, 256),
    default=None,
    help="Hamming distance that counts as a match (default 31).",
)


@click.group("hash-lists")
def hash_lists() -> None:
    """Imported PDQ hash lists (banks): list them, show one (size, who imported it when, the images it matches
    and through which transform, its history), export one as hash lines, delete one (recorded, with who and why).

    Lists come in with `nsfw-index import-hashes`. Images match on their PDQ hash or on any of its 8 dihedral hashes
    (rotations and mirrors), within --pdq-max-distance (default 31).

    \b
    Example:
      nsfw-index hash-lists list --store ./store
      nsfw-index hash-lists show removed-2026 --store ./store
      nsfw-index hash-lists export removed-2026 --store ./store --out removed.txt
      nsfw-index hash-lists delete removed-2026 --store ./store --reason "superseded by removed-2027" --yes
    """


@hash_lists.command("list")
@store_option
@DISTANCE
@json_option("One JSON object per list.")
@handle_errors
def list_cmd(store: Path | None, pdq_max_distance: int | None, as_json: bool) -> None:
    """Every imported list: entries, latest import (when, by whom), the stored images it matches.

    \b
    Example:
      nsfw-index hash-lists list --store ./store --json
    """
    from search.labels import list_hash_lists
    from search.store import Store

    settings = settings_from(store=store, pdq_max_distance=pdq_max_distance)
    with Store(require_store(settings), readonly=True) as handle:
        found = list_hash_lists(handle, settings)
    for s in found:
        if as_json:
            emit(s.to_json())
        else:
            by = _transforms(s.matched_by_transform)
            click.echo(
                f"{s.name}: {s.entries} entries, imported {s.imported_at} by {s.imported_by or 'unknown'}, "
                f"{s.matched_images} images match{by}"
            )
    if not found and not as_json:
        click.echo("no hash lists (import one with `nsfw-index import-hashes FILE --name NAME`)", err=True)


@hash_lists.command("show")
@click.argument("name")
@store_option
@DISTANCE
@json_option("The list as one JSON object (what GET /v1/hash-lists/{name} answers).")
@handle_errors
def show_cmd(name: str, store: Path | None, pdq_max_distance: int | None, as_json: bool) -> None:
    """One list: entries, source, latest import (when, by whom), images it matches (by transform), its history.

    \b
    Example:
      nsfw-index hash-lists show removed-2026 --store ./store
    """
    from search.labels import show_hash_list
    from search.store import Store

    settings = settings_from(store=store, pdq_max_distance=pdq_max_distance)
    with Store(require_store(settings), readonly=True) as handle:
        d = show_hash_list(handle, name, settings)
    if as_json:
        emit(d.to_json())
        return
    click.echo(f"list {d.name} (id {d.list_id}): {d.entries} entries, {d.bad_lines} bad lines over its imports")
    click.echo(f"  latest import {d.imported_at} by {d.imported_by or 'unknown'} from {d.source or 'unknown'}")
    click.echo(
        f"  {d.matched_images} stored images within PDQ distance {d.max_distance}{_transforms(d.matched_by_transform)}"
    )
    if d.images_without_dihedral:
        click.echo(
            f"  {d.images_without_dihedral} stored images have no dihedral hashes (indexed before they were kept): "
            "they match on their own hash only until `nsfw-index index ... --rebuild`"
        )
    for e in d.events:
        why = f" ({e.reason})" if e.reason else ""
        click.echo(f"  {e.at} {e.action} by {e.who}: {e.changed} entries, {e.entries} after{why}")


@hash_lists.command("export")
@click.argument("name")
@store_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File (default stdout).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with `hash` and `note` columns instead of hash lines.")
@handle_errors
def export_cmd(name: str, store: Path | None, out: Path | None, as_csv: bool) -> None:
    """Export a list as one lowercase hex PDQ hash per line (what ThreatExchange tools exchange), or --csv with
    notes; `nsfw-index import-hashes` reads either back.

    \b
    Example:
      nsfw-index hash-lists export removed-2026 --store ./store --out removed.txt
    """
    from search.errors import InvalidArgument
    from search.labels import export_hash_list
    from search.store import Store

    settings = settings_from(store=store)
    with Store(require_store(settings), readonly=True) as handle:
        text = export_hash_list(handle, name, csv_format=as_csv)
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        raise InvalidArgument(f"cannot write {out}: {e.strerror or e}") from e
    written = text.count("\n") - (1 if as_csv else 0)
    click.echo(f"list {name}: {written} hashes written to {out}", err=True)


@hash_lists.command("delete")
@click.argument("name")
@store_option
@click.option("--reason", default=None, help="Why (kept in the hash-list event log).")
@click.option("--who", default=None, help="Who deletes (default: the login name).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed when stdin is not a terminal).")
@DISTANCE
@json_option()
@handle_errors
def delete_cmd(
    name: str,
    store: Path | None,
    reason: str | None,
    who: str | None,
    yes: bool,
    pdq_max_distance: int | None,
    as_json: bool,
) -> None:
    """Delete a list, its entries and their matches; who, when and why are recorded (its history stays). Images
    known-unsafe only through it stop being so; label events are untouched.

    \b
    Example:
      nsfw-index hash-lists delete removed-2026 --store ./store --reason "superseded" --yes
    """
    from search.labels import delete_hash_list
    from search.store import Store

    settings = settings_from(store=store, pdq_max_distance=pdq_max_distance)
    root = require_store(settings)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"deleting hash list {name!r} needs --yes when stdin is not a terminal")
        click.confirm(f"delete hash list {name!r} from {root}?", abort=True)
    # writable, without the writer lock (as imports and labels)
    with Store(root) as handle:
        out = delete_hash_list(handle, name, settings, who=who, reason=reason)
    if as_json:
        emit(out.to_json())
        return
    click.echo(
        f"deleted list {out.name}: {out.entries_removed} entries, {out.images_unmatched} images match no list now, "
        f"{len(out.no_longer_known_unsafe)} no longer known-unsafe (event {out.event.event}, by {out.event.who})",
        err=True,
    )


def _transforms(counts: dict[str, int]) -> str:
    """` (original 3, flipH 1)`, or nothing when no image matches."""
    return f" ({', '.join(f'{t} {n}' for t, n in counts.items())})" if counts else ""
