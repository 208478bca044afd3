"""The routes' `Annotated` dependencies and shared parameters: the Service, callers with a right, per-request stores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi import Path as PathParam

from api import schemas
from api.auth import Caller, require
from api.errors import ApiError
from api.state import Service
from search.store import Store

#: The largest id a path accepts (SQLite's INTEGER PRIMARY KEY range).
MAX_ID = 2**63 - 1


def service(request: Request) -> Service:
    """The running server's state; 503 while the lifespan has not opened it (or has closed it)."""
    svc: Service | None = getattr(request.app.state, "service", None)
    if svc is None:
        raise ApiError(503, "not_ready", "the server is starting")
    return svc


ServiceDep = Annotated[Service, Depends(service)]

# callers holding a right (401 without a key where one is needed, 403 with a key lacking it)
Reader = Annotated[Caller, Depends(require("read"))]
Writer = Annotated[Caller, Depends(require("write"))]
Labeller = Annotated[Caller, Depends(require("label"))]


def read_store(svc: ServiceDep) -> Iterator[Store]:
    """One read-only connection for the request, opened once and closed after it."""
    with Store(svc.store_dir, readonly=True) as store:
        yield store


def write_store(svc: ServiceDep) -> Iterator[Store]:
    """One writable connection for the request (labels, hash lists: no writer lock needed), closed after it."""
    with Store(svc.store_dir) as store:
        yield store


ReadStore = Annotated[Store, Depends(read_store)]
WriteStore = Annotated[Store, Depends(write_store)]

# -- parameters shared by several routes -------------------------------------------------------------------------------
ImageId = Annotated[int, PathParam(alias="id", ge=1, le=MAX_ID, description="An image id of the store.")]
K = Annotated[int | None, Query(ge=1, le=1000, description="Nearest known-unsafe images to return (default 10).")]
Sources = Annotated[
    list[schemas.Source] | None,
    Query(alias="source", description="Only known-unsafe neighbours from these sources (repeatable)."),
]
MinSimilarity = Annotated[
    float | None,
    Query(ge=-1.0, le=1.0, allow_inf_nan=False, description="Only known-unsafe neighbours at least this similar."),
]
Threshold = Annotated[
    float | None,
    Query(
        ge=-1.0, le=1.0, allow_inf_nan=False, description="Near-duplicate cosine similarity threshold (default 0.90)."
    ),
]
