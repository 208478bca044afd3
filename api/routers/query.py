"""Query routes: `POST /v1/query` (uploads through the model) and `GET /v1/images/{id}/neighbours` (no model run)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api import schemas
from api.deps import ImageId, K, MinSimilarity, Reader, ServiceDep, Sources, Threshold
from api.errors import ApiError, error_code, http_status
from api.routers.common import BINARY, SearchOptions, errors, ms, multipart, query_timings
from api.uploads import MULTIPART_HINT, read_form
from indexer.analyze import Analysis, query_answer
from search.errors import InvalidImage, NotFound
from search.query import Searcher

router = APIRouter()

QUERY_BODY = multipart(
    {
        "file": {**BINARY, "description": "One image (JPEG, PNG, WebP, GIF, BMP or TIFF)."},
        "files": {
            "type": "array",
            "items": BINARY,
            "description": "Several images, answered in order (at most max_images_per_request in all).",
        },
    }
)
# a body holds `file` or `files` (or both) and nothing else: without an image, or with another part, the answer is
# 422. Said as minProperties + additionalProperties rather than anyOf-required: a multipart body cannot carry the
# type violations a fuzzer derives from anyOf branches
_QUERY_SCHEMA = QUERY_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]
_QUERY_SCHEMA.update(minProperties=1, additionalProperties=False)


def failure(e: InvalidImage, filename: str | None) -> schemas.QueryFailure:
    """An image that could not be analysed, listed among the others' answers."""
    return schemas.QueryFailure(
        filename=filename,
        status=http_status(e)[0],
        error=schemas.ErrorBody(code=error_code(e), message=str(e)),
    )


def answer(
    a: Analysis, searcher: Searcher | None, filename: str | None, show_paths: bool, options: SearchOptions
) -> schemas.QueryResult:
    """One analysed image's answer; without the read_paths right its neighbours' paths are left out."""
    ans = query_answer(a, searcher, **options.kwargs())
    if not show_paths:
        for n in ans.nearest_unsafe:
            n.paths = None
        if ans.exact_duplicates is not None:
            ans.exact_duplicates.paths = None
    return schemas.QueryResult.of(ans, filename)


@router.post(
    "/v1/query",
    response_model=schemas.QueryResponse,
    openapi_extra=QUERY_BODY,
    tags=["query"],
    responses=errors(400, 401, 403, 413, 415, 422, 503),
)
async def query(
    request: Request,
    caller: Reader,
    svc: ServiceDep,
    k: K = None,
    source: Sources = None,
    min_similarity: MinSimilarity = None,
    threshold: Threshold = None,
) -> schemas.QueryResponse:
    """Score uploaded images and find their nearest known-unsafe images, near-duplicates and PDQ matches.

    Multipart field `file` (one image) or `files` (several). Per image, the fields `nsfw-index query --json`
    prints. When every image fails the answer is that image's error (400 corrupt, 413 too large, 415 not an
    accepted format); otherwise failed images are listed with their error among the results.
    """
    t0 = time.perf_counter()
    svc.query_searcher()  # 503 before reading the body when the store belongs to another model
    svc.worker.check_capacity()  # and when the queue is full
    form = await read_form(request)
    uploads = form.files("file", "files")
    if not uploads:
        raise ApiError(422, "invalid_request", f"no image in the request: {MULTIPART_HINT}")
    others = sorted({p.name for p in form.parts} - {"file", "files"})
    if others:
        raise ApiError(422, "invalid_request", f"unknown multipart part(s) {others}: {MULTIPART_HINT}")
    if any(u.filename is None for u in uploads):  # a text field where the schema has a file (binary) part
        raise ApiError(422, "invalid_request", f"`file`/`files` must be file parts (with a filename): {MULTIPART_HINT}")
    analyses, info = await svc.worker.analyze([(u.filename or u.name, u.data) for u in uploads])
    failures = [a for a in analyses if isinstance(a, InvalidImage)]
    if len(failures) == len(analyses):
        raise failures[0]
    searcher = svc.query_searcher()
    options = SearchOptions.of(k, source, min_similarity, threshold)
    show = caller.can("read_paths")

    def answer_all() -> list[schemas.QueryResult | schemas.QueryFailure]:
        return [
            failure(a, u.filename) if isinstance(a, InvalidImage) else answer(a, searcher, u.filename, show, options)
            for a, u in zip(analyses, uploads, strict=True)
        ]

    ts = time.perf_counter()
    results = await run_in_threadpool(answer_all)
    return schemas.QueryResponse(
        results=results,
        model=svc.model_info,
        index=svc.index_summary(),
        timings=query_timings(info, time.perf_counter() - ts, t0),
    )


@router.get(
    "/v1/images/{id}/neighbours",
    response_model=schemas.NeighboursResponse,
    tags=["query"],
    responses=errors(401, 403, 404, 422, 503),
)
async def neighbours(
    image_id: ImageId,
    caller: Reader,
    svc: ServiceDep,
    k: K = None,
    source: Sources = None,
    min_similarity: MinSimilarity = None,
    threshold: Threshold = None,
) -> schemas.NeighboursResponse:
    """The query answer for an indexed image, from its stored embedding: no model run, it leaves itself out."""
    t0 = time.perf_counter()
    searcher = svc.query_searcher(require_model=False)
    if searcher is None:
        raise NotFound(f"no image with id {image_id}: the store has no images yet")
    options = SearchOptions.of(k, source, min_similarity, threshold)
    ans = await run_in_threadpool(lambda: searcher.neighbours(image_id, **options.kwargs()))
    if not caller.can("read_paths"):
        for n in ans.nearest_unsafe:
            n.paths = None
        ans.exact_duplicates.paths = None
    took = ms(time.perf_counter() - t0)
    return schemas.NeighboursResponse.model_validate(
        {
            **ans.model_dump(),
            "model": svc.store_model_info(),
            "timings": schemas.SearchTimings(search_ms=took, total_ms=took),
        }
    )
