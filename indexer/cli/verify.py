"""The `verify` verb: SQLite integrity, the label chain, FAISS checksums and ids; exit 1 when something is wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from indexer.cli.options import (
    EXIT_FAILED_ITEMS,
    emit,
    handle_errors,
    json_option,
    require_store,
    settings_from,
    store_option,
)


@click.command()
@store_option
@json_option("Print the report as one JSON object.")
@handle_errors
def verify(store: Path | None, as_json: bool) -> None:
    """Check a store: PRAGMA integrity_check, the label log's hash chain, the sha256 of each FAISS file, and that
    the FAISS ids are the SQLite ids. Changes nothing.

    \b
    Example:
      nsfw-index verify --store ./store
    Exit status 0 when every check passes, 1 when a problem was found (each is named), 2 when the store cannot be
    opened. A damaged FAISS file is rebuilt from SQLite by `nsfw-index rebuild` (or the next index run).
    """
    from search.store import Store
    from search.verify import verify_store

    settings = settings_from(store=store)
    with Store(require_store(settings), readonly=True) as handle:
        report = verify_store(handle, settings)
    if as_json:
        emit(report.to_json())
    else:
        for check in report.checks:
            click.echo(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}")
            for problem in check.problems:
                click.echo(f"      problem: {problem}")
            for note in check.notes:
                click.echo(f"      note: {note}")
        click.echo("store verified: no problems" if report.ok else "problems found (see above)")
    if not report.ok:
        sys.exit(EXIT_FAILED_ITEMS)
