"""Hash-list routes: `POST /v1/hash-lists` imports a PDQ hash list (the text of the upload, never written to disk);
`GET /v1/hash-lists[/{name}]`, `GET /v1/hash-lists/{name}/export` and `DELETE /v1/hash-lists/{name}` manage them."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from api import schemas
from api.deps import ReadStore, ServiceDep, Writer, WriteStore
from api.errors import ApiError
from api.routers.common import BINARY, errors, multipart
from api.uploads import read_form
from search.labels import (
    MAX_LIST_NAME,
    delete_hash_list,
    export_hash_list,
    import_hash_list,
    list_hash_lists,
    show_hash_list,
)
from search.pdq import hash_list_lines

router = APIRouter()

MAX_BAD_LINES_SHOWN = 1000
MAX_BAD_LINE_TEXT = 200

HASH_LIST_BODY = multipart(
    {
        "file": {**BINARY, "description": "One PDQ hash (64 hex) per line, or a CSV with a `hash` column."},
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "description": "The list's name."},
    },
    ["file", "name"],
)


@router.post(
    "/v1/hash-lists",
    response_model=schemas.HashListResponse,
    openapi_extra=HASH_LIST_BODY,
    tags=["hash lists"],
    responses=errors(400, 401, 403, 413, 415, 422, 503),
)
async def import_hashes(
    request: Request,
    caller: Writer,
    svc: ServiceDep,
    store: WriteStore,
    replace: Annotated[bool, Query(description="Replace the list of that name.")] = False,
) -> schemas.HashListResponse:
    """Import a PDQ hash list (multipart `file` and `name`); every indexed image is matched against it.

    Lines that hold no valid hash are reported in `bad_lines`, not fatal.
    """
    form = await read_form(request)
    files = form.files("file")
    name = (form.field("name") or "").strip()
    if len(files) != 1 or not name or len(name) > 200:
        raise ApiError(
            422,
            "invalid_request",
            "send the list in multipart field `file` and its name (1 to 200 characters) in field `name`",
        )
    # the upload's own name in errors (it is never written to a file)
    lines = hash_list_lines(files[0].data, repr(files[0].filename or "the upload"))
    imported = await run_in_threadpool(
        lambda: import_hash_list(
            store, lines, name, svc.settings, replace=replace, source="http-upload", who=caller.name
        )
    )
    await run_in_threadpool(svc.refresh_now)
    return schemas.HashListResponse.of(imported, max_lines=MAX_BAD_LINES_SHOWN, max_text=MAX_BAD_LINE_TEXT)


ListName = Annotated[str, PathParam(min_length=1, max_length=MAX_LIST_NAME, description="The list's name.")]
# Hash lists are what a trust & safety team must not leak: every route here needs the `write` right.


@router.get(
    "/v1/hash-lists",
    response_model=schemas.HashListsResponse,
    tags=["hash lists"],
    responses=errors(401, 403, 503),
)
def get_hash_lists(caller: Writer, svc: ServiceDep, store: ReadStore) -> schemas.HashListsResponse:
    """Every imported list: entries, latest import (when, by whom), stored images it matches (by transform)."""
    return schemas.HashListsResponse(lists=list_hash_lists(store, svc.settings))


@router.get(
    "/v1/hash-lists/{name}",
    response_model=schemas.HashListDetail,
    tags=["hash lists"],
    responses=errors(401, 403, 404, 422, 503),
)
def get_hash_list(name: ListName, caller: Writer, svc: ServiceDep, store: ReadStore) -> schemas.HashListDetail:
    """One list: entries, latest import, stored images it matches (configured distance, dihedral hashes included,
    by transform) and its history (imports, replaces, deletes of that name)."""
    return show_hash_list(store, name, svc.settings)


@router.get(
    "/v1/hash-lists/{name}/export",
    response_class=Response,
    tags=["hash lists"],
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "One lowercase hex PDQ hash per line (`format=csv`: a CSV with `hash` and `note` columns); "
            "`POST /v1/hash-lists` reads either back.",
        },
        **errors(401, 403, 404, 422, 503),
    },
)
def export_list(
    name: ListName,
    caller: Writer,
    store: ReadStore,
    format: Annotated[Literal["hex", "csv"], Query(description="Hash lines, or CSV with notes.")] = "hex",
) -> Response:
    """The list's hashes as text (ThreatExchange's plain format: one hex hash a line)."""
    text = export_hash_list(store, name, csv_format=format == "csv")
    media = "text/csv" if format == "csv" else "text/plain"
    return Response(text, media_type=f"{media}; charset=utf-8", headers={"Cache-Control": "no-store"})


@router.delete(
    "/v1/hash-lists/{name}",
    response_model=schemas.HashListDeleted,
    tags=["hash lists"],
    responses=errors(401, 403, 404, 422, 503),
)
async def delete_list(
    name: ListName,
    caller: Writer,
    svc: ServiceDep,
    store: WriteStore,
    reason: Annotated[str | None, Query(max_length=1000, description="Why (kept in the event log).")] = None,
) -> schemas.HashListDeleted:
    """Delete a list, its entries and their matches; the caller, time and reason are recorded in the hash-list
    event log (its history stays). Images known-unsafe only through it stop being so; labels are untouched."""
    out = await run_in_threadpool(lambda: delete_hash_list(store, name, svc.settings, who=caller.name, reason=reason))
    await run_in_threadpool(svc.refresh_now)
    return out
