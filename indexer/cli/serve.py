"""The `serve` verb: the HTTP API under uvicorn (the one place the CLI imports `api`, inside the command)."""

from __future__ import annotations

from typing import Any

import click

from indexer.cli.options import (
    handle_errors,
    model_options,
    preflight_model,
    require_store,
    settings_from,
    store_option,
)


@click.command()
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
@click.option("--create", is_flag=True, help="Start on a new empty store when there is none at --store.")
@handle_errors
def serve(host: str, port: int, create: bool, **flags: Any) -> None:
    """Serve the HTTP API (FastAPI under uvicorn; OpenAPI at /openapi.json, routes under /v1).

    \b
    Example:
      NSFW_INDEX_API_KEYS=s3cret:read+write+label nsfw-index serve --store ./store --port 8000
    """
    settings = settings_from(**flags)
    require_store(settings)
    preflight_model(settings)
    from api.server import run_server

    run_server(settings, host=host, port=port, create=create)
