"""Hash-list route: `POST /v1/hash-lists` imports a PDQ hash list (the text of the upload, never written to disk)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api import schemas
from api.deps import ServiceDep, Writer, WriteStore
from api.errors import ApiError
from api.routers.common import BINARY, errors, multipart
from api.uploads import read_form
from search.labels import import_hash_list
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
            store, lines, name, svc.settings, replace=replace, source=f"http-upload by {caller.name}"
        )
    )
    await run_in_threadpool(svc.refresh_now)
    return schemas.HashListResponse.of(imported, max_lines=MAX_BAD_LINES_SHOWN, max_text=MAX_BAD_LINE_TEXT)
