"""`nsfw-index serve`: load the model (failing fast on a bad one), then run the app under uvicorn."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from api.app import create_app
from api.protocol import server_options
from indexer.extractor import Extractor
from search.errors import InvalidArgument, StoreNotFound
from search.settings import Settings
from search.store import Store
from search.store.base import DB_FILE

log = logging.getLogger(__name__)


def run_server(
    settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", create: bool = False
) -> None:
    """Serve until SIGINT/SIGTERM. Port 0 takes any free port (the log line says which).

    A path with no store is refused (StoreNotFound, naming the `index` command that creates one) unless `create`:
    then the server starts on an empty store on purpose. Model and store problems raise NsfwIndexError before the
    port is opened, so the CLI reports them cleanly.
    """
    if settings.store is None:
        raise InvalidArgument("the HTTP service needs a store: set --store or NSFW_INDEX_STORE")
    if settings.store.exists() and not settings.store.is_dir():
        raise StoreNotFound(f"{settings.store} is not a directory")
    if not create and not (settings.store / DB_FILE).exists():
        raise StoreNotFound(
            f"no store at {settings.store}: create one with `nsfw-index index PATH... --store {settings.store}`, "
            f"or start on an empty store on purpose with `nsfw-index serve --create --store {settings.store}`"
        )
    Store(settings.store, create=create).close()  # applies migrations (creates an empty store with --create)
    extractor = Extractor.from_settings(settings)
    app = create_app(settings, extractor=extractor)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=10,
            **server_options(settings),  # JSON connection-level errors, connection cap, header timeout
        )
    )
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn logged why (e.g. the port is taken, or startup failed)


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread (tests, benchmarks): `with BackgroundServer(app) as s: s.url`."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout: float = 60.0,
    ) -> None:
        options = server_options(getattr(getattr(app, "state", None), "settings", None))
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", **options)
        )
        self.host = host
        self.startup_timeout = startup_timeout
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.005)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)
