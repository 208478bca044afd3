"""The FastAPI application factory: lifespan (model, Searcher, worker, snapshot refresher), handlers, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from api.auth import KeyRing, parse_api_keys
from api.errors import install_handlers
from api.limits import BodySizeLimit
from api.routers import ROUTERS, include_routers
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

Limits: a body that stalls or takes too long gets 408; uploads past the pixel caps 413; a server busy decoding
(pixel or body budget) or past its connection cap answers 503 with `Retry-After` at once.
"""

#: The security requirement of a route anyone may call, a key optional (OpenAPI: the empty requirement is "none").
OPTIONAL_BEARER: list[dict[str, list[str]]] = [{}, {"HTTPBearer": []}]


def _rights(dependant: Dependant) -> set[str]:
    """The `require_<right>` dependencies (api.auth.require) anywhere in a route's dependency tree."""
    out: set[str] = set()
    for d in dependant.dependencies:
        name = getattr(d.call, "__name__", "")
        if name.startswith("require_"):
            out.add(name.removeprefix("require_"))
        out |= _rights(d)
    return out


def _openapi(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document as the server behaves: read routes take a key optionally (unless read_requires_key), and
    every route with a body documents the 408 of a stalled body read."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for route in (r for router in ROUTERS for r in router.routes):  # included without a prefix
                if not isinstance(route, APIRoute):
                    continue
                for method in route.methods or ():
                    op = doc["paths"].get(route.path_format, {}).get(method.lower())
                    if op is None:
                        continue
                    if _rights(route.dependant) == {"read"} and not settings.read_requires_key:
                        op["security"] = OPTIONAL_BEARER
                    if "requestBody" in op:
                        op.setdefault("responses", {}).setdefault(
                            "408",
                            {
                                "description": "The body stalled or took too long",
                                "content": {
                                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                                },
                            },
                        )
            app.openapi_schema = doc
        return app.openapi_schema

    return build


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
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        budget=settings.body_bytes_budget,
        idle_seconds=settings.body_idle_seconds,
        total_seconds=settings.body_total_seconds,
    )
    app.openapi = _openapi(app, settings)  # type: ignore[method-assign]
    return app
