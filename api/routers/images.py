"""Image routes: `GET /v1/images/{id}`, `GET /v1/images?external_id=X`, `POST /v1/images` (add to the index),
`DELETE /v1/images/{id}` (forget) and `PUT /v1/images/{id}/label`."""

from __future__ import annotations

import time
import unicodedata
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from starlette.concurrency import run_in_threadpool

from api import schemas
from api.deps import ImageId, Labeller, Reader, ReadStore, ServiceDep, Writer, WriteStore
from api.errors import ApiError
from api.routers.common import BINARY, SearchOptions, errors, multipart, query_timings
from api.routers.query import answer
from api.uploads import Part, read_form
from search.errors import InvalidImage, ModelMismatch
from search.forget import (
    MAX_EXTERNAL_ID,
    ExternalIdConflict,
    assign_external_id,
    check_external_id,
    external_id_holder,
    forget,
)
from search.images import image_detail
from search.labels import label_images
from search.store import Store

router = APIRouter()

#: Seconds an HTTP add waits for the store's writer lock (held by an `nsfw-index index` run) before a 503.
WRITE_LOCK_TIMEOUT = 5.0

ADD_BODY = multipart(
    {
        "file": {**BINARY, "description": "The image to add to the index."},
        "external_id": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_EXTERNAL_ID,
            "description": "The caller's own id for this image: kept, searchable (GET /v1/images?external_id=), "
            "returned; one image per external id (409 when another image holds it).",
        },
    },
    ["file"],
)


@router.get(
    "/v1/images/{id}",
    response_model=schemas.ImageResponse,
    tags=["images"],
    responses=errors(401, 403, 404, 422, 503),
)
def get_image(image_id: ImageId, caller: Reader, svc: ServiceDep, store: ReadStore) -> schemas.ImageResponse:
    """One indexed image: scores, PDQ, known-unsafe sources and its label history (no file is ever served)."""
    detail = image_detail(store, image_id, svc.settings)
    if not caller.can("read_paths"):
        detail.paths = None
    return schemas.ImageResponse.model_validate(detail.model_dump())


@router.post(
    "/v1/images",
    response_model=schemas.AddResponse,
    openapi_extra=ADD_BODY,
    tags=["images"],
    responses=errors(400, 401, 403, 409, 413, 415, 422, 503),
)
async def add_image(request: Request, caller: Writer, svc: ServiceDep) -> schemas.AddResponse:
    """Add an uploaded image (multipart field `file`) to the index; answers with its id and its query answer.

    Committed to the store before the answer (it survives a crash), and visible to the next query. The upload is
    recorded under the path `upload://SHA256`; nothing the client sent is stored as a path. The optional field
    `external_id` gives the image the caller's own id (409 when another image holds it, or this content already
    has another one: nothing is written then).
    """
    from indexer.service import add_image as engine_add

    t0 = time.perf_counter()
    if svc.mismatch:
        raise ApiError(409, "model_mismatch", svc.mismatch)
    svc.worker.check_capacity()
    form = await read_form(request)
    uploads = form.files("file", "files")
    if len(uploads) != 1:
        raise ApiError(422, "invalid_request", "send exactly one image, in multipart field `file`")
    upload = uploads[0]
    external_id = _external_id_field(form.files("external_id"))
    analyses, info = await svc.worker.analyze([(upload.filename or upload.name, upload.data)])
    analysis = analyses[0]
    if isinstance(analysis, InvalidImage):
        raise analysis

    def write() -> tuple[int, bool, str | None]:
        # the writer lock: an `nsfw-index index` run holding it gets WRITE_LOCK_TIMEOUT seconds, then a 503
        with Store.writing(svc.store_dir, "nsfw-index add", create=True, timeout=WRITE_LOCK_TIMEOUT) as store:
            if external_id is not None:
                external_id_holder(store, external_id, analysis.sha256)  # a conflict writes nothing
            image_id, created = engine_add(store, svc.extractor, svc.settings, analysis, data=upload.data)
            if external_id is not None:
                assign_external_id(store, image_id, external_id)
            return image_id, created, store.external_ids([image_id]).get(image_id)

    try:
        image_id, created, kept_id = await run_in_threadpool(write)
    except ModelMismatch as e:
        raise ApiError(409, "model_mismatch", str(e)) from None
    except ExternalIdConflict as e:
        raise ApiError(409, "external_id_conflict", str(e)) from None
    await run_in_threadpool(svc.refresh_now)
    searcher = svc.query_searcher()
    ts = time.perf_counter()
    result = await run_in_threadpool(
        answer, analysis, searcher, upload.filename, caller.can("read_paths"), SearchOptions()
    )
    return schemas.AddResponse(
        id=image_id,
        created=created,
        external_id=kept_id,
        result=result,
        model=svc.model_info,
        timings=query_timings(info, time.perf_counter() - ts, t0),
    )


def _external_id_field(parts: list[Part]) -> str | None:
    """The `external_id` form field, checked (422: a file part, repeated, not UTF-8, or not a valid external id)."""
    if not parts:
        return None
    if len(parts) > 1 or parts[0].filename is not None:
        raise ApiError(422, "invalid_request", "`external_id` must be one text field (not a file part)")
    try:
        text = parts[0].data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_request", "`external_id` must be UTF-8 text") from None
    return check_external_id(text)


@router.get(
    "/v1/images",
    response_model=schemas.ImageListResponse,
    tags=["images"],
    responses=errors(401, 403, 422, 503),
)
def find_images(
    external_id: Annotated[
        str, Query(min_length=1, max_length=MAX_EXTERNAL_ID, description="The caller's own id given at add time.")
    ],
    caller: Reader,
    svc: ServiceDep,
    store: ReadStore,
) -> schemas.ImageListResponse:
    """The image with this external id, as `GET /v1/images/{id}` answers it (`images` is empty when none has it)."""
    found = store.image_by_external_id(external_id)
    images = []
    if found is not None:
        detail = image_detail(store, found, svc.settings)
        if not caller.can("read_paths"):
            detail.paths = None
        images.append(schemas.ImageResponse.model_validate(detail.model_dump()))
    return schemas.ImageListResponse(images=images)


@router.delete(
    "/v1/images/{id}",
    response_model=schemas.ForgetResponse,
    tags=["images"],
    responses=errors(401, 403, 404, 422, 503),
)
async def forget_image(image_id: ImageId, caller: Writer, svc: ServiceDep) -> schemas.ForgetResponse:
    """Forget an image: its row, paths, vector (the FAISS files are rewritten before the answer), thumbnails,
    cluster memberships and hash-list matches. Its label events stay (the audit trail outlives the image); the
    removal is recorded as a run of kind `forget` naming the API key. 404 for an unknown id, and for an image
    already forgotten (the message says when and by whom). The next query no longer finds it.
    """

    def write() -> schemas.ForgetResponse:
        with Store.writing(svc.store_dir, "nsfw-index forget", timeout=WRITE_LOCK_TIMEOUT) as store:
            done = forget(store, image_id, svc.settings, who=caller.name)
        return schemas.ForgetResponse.model_validate(done.model_dump())

    result = await run_in_threadpool(write)
    await run_in_threadpool(svc.refresh)  # a new snapshot without the vector, swapped in before the answer
    return result


def clean_who(who: str | None) -> str | None:
    """A reviewer name as recorded: NFC, printable characters only, whitespace collapsed, at most 100 characters."""
    if who is None:
        return None
    text = "".join(c for c in unicodedata.normalize("NFC", who) if c.isprintable()).strip()
    return " ".join(text.split())[:100] or None


@router.put(
    "/v1/images/{id}/label",
    response_model=schemas.LabelResponse,
    tags=["images"],
    responses=errors(401, 403, 404, 413, 422, 503),
)
def label_image(
    image_id: ImageId,
    body: Annotated[schemas.LabelRequest, Body()],
    caller: Labeller,
    svc: ServiceDep,
    store: WriteStore,
) -> schemas.LabelResponse:
    """Label an image unsafe or safe (or clear the label): an event appended to the store's label log.

    A `safe` overrides the model only; overriding the image's hash-list matches is a separate, explicit act
    (`override_hash_lists: true` with a `reason`), recorded in the log and shown in the image's answers
    (`hash_list_override`). The event's `who` is the API key's identity, followed by the body's `who` (a reviewer
    name) if given. Committed before the answer, and visible to the next query.
    """
    who = caller.name + (f"/{w}" if (w := clean_who(body.who)) else "")
    store.image(image_id)  # 404 before anything is written (and never a path lookup by accident)
    [result] = label_images(
        store,
        [str(image_id)],
        body.label,
        svc.settings,
        who=who,
        reason=body.reason,
        override_hash_lists=body.override_hash_lists,
    )
    svc.refresh_now()
    sources = store.known_unsafe(svc.settings, ids=[image_id])[image_id]
    return schemas.LabelResponse.of(result, sources)
