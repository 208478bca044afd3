"""The FastAPI application factory: lifespan (model, Searcher, worker, snapshot refresher), handlers, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.auth import KeyRing, parse_api_keys
from api.errors import install_handlers
from api.limits import BodySizeLimit
from api.routers import include_routers
from api.state import Service
from indexer.extractor import Extractor
from search.errors import InvalidArgument
from search.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """NSFW scores (Freepik EVA-02 classifier), nearest known-unsafe images, near-duplicates, PDQ matches
and clusters for an image corpus indexed with `nsfw-index index`.

Writes need `Authorization: Bearer KEY` with the right named on the route (keys and rights: NSFW_INDEX_API_KEYS).
Every error is JSON: `{"error": {"code": ..., "message": ...}}`. Stored file paths appear only for keys with the
`read_paths` right; no route serves files.
"""


async def _refresher(svc: Service, every: float) -> None:
    """Every `every` seconds: catch up with the store, swapping in a new FAISS snapshot once it is loaded."""
    while True:
        await asyncio.sleep(every)
        try:
            await run_in_threadpool(svc.refresh)
        except Exception:  # keep refreshing: the next round may succeed; /readyz reports what it can
            log.exception("background refresh failed")


def _redactor(store_dir: Path) -> Callable[[str], str]:
    """Engine messages name the store directory; HTTP clients get `<store>` instead of a server path."""
    names = sorted({str(store_dir), str(store_dir.expanduser().resolve())}, key=len, reverse=True)

    def redact(message: str) -> str:
        for name in names:
            message = message.replace(name, "<store>")
        return message

    return redact


def create_app(settings: Settings, *, extractor: Extractor | None = None) -> FastAPI:
    """The app for `settings.store`. The model is `extractor` when given (shared by tests, loaded up front by
    `run_server` so that a bad --model fails before listening), else loaded in the lifespan."""
    if settings.store is None:
        raise InvalidArgument("the HTTP service needs a store: set --store or NSFW_INDEX_STORE")
    keyring = KeyRing(parse_api_keys(settings.api_keys))
    if not len(keyring):
        log.warning("no API keys configured (NSFW_INDEX_API_KEYS): write routes will answer 401")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ex = extractor if extractor is not None else await run_in_threadpool(Extractor.from_settings, settings)
        svc = Service(settings, ex)
        await run_in_threadpool(svc.open)
        app.state.service = svc
        task = asyncio.create_task(_refresher(svc, settings.reload_seconds), name="nsfw-index-refresher")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            app.state.service = None
            await run_in_threadpool(svc.close)

    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("nsfw-index")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
        app_version = "0"
    app = FastAPI(title="nsfw-index", version=app_version, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.service = None
    install_handlers(app, _redactor(Path(settings.store)))
    include_routers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
