"""The `forget` verb: remove one image from a store (its label events stay)."""

from __future__ import annotations

from pathlib import Path

import click

from indexer.cli.options import emit, handle_errors, json_option, require_store, settings_from, store_option


@click.command()
@click.argument("ref", required=False)
@store_option
@click.option("--external-id", default=None, help="Name the image by its external id (given at POST /v1/images).")
@click.option("--who", default=None, help="Who forgets it, for the audit record (default: the login name).")
@json_option()
@handle_errors
def forget(ref: str | None, store: Path | None, external_id: str | None, who: str | None, as_json: bool) -> None:
    """Forget one image, named by id, sha256 or stored path (or --external-id): its row, paths, vector, thumbnails,
    cluster memberships and hash-list matches. Its label events stay (the log is keyed by content: they apply
    again if the content comes back). The removal is recorded as a run of kind `forget`; the FAISS files are
    rewritten at once. Needs the writer lock (not while an index run goes on). A later index run over a folder
    that still holds the file adds it again.

    \b
    Example:
      nsfw-index forget 17 --store ./store
      nsfw-index forget --external-id ticket-4711 --store ./store --json
    Exit status 2 when the image is unknown or was already forgotten (the message says when and by whom).
    """
    from search.forget import forget as forget_image
    from search.forget import resolve_for_forget
    from search.labels import default_who
    from search.store import Store

    if (ref is None) == (external_id is None):
        raise click.UsageError("name one image: an ID, SHA256 or path, or --external-id X")
    settings = settings_from(store=store)
    with Store.writing(require_store(settings), "nsfw-index forget") as handle:
        image_id = resolve_for_forget(handle, ref=ref, external_id=external_id)
        done = forget_image(handle, image_id, settings, who=who or default_who())
    if as_json:
        emit(done.to_json())
        return
    ext = f", external id {done.external_id!r}" if done.external_id else ""
    click.echo(
        f"forgot image {done.id} (sha256 {done.sha256}{ext}): {done.paths} path(s) removed, "
        f"{done.label_events_kept} label event(s) kept; recorded as run {done.run_id}"
    )
