"""Query routes: `POST /v1/query` (multipart uploads or a JSON form through the model, or an embedding) and
`GET /v1/images/{id}/neighbours` (no model run)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api import schemas
from api.deps import ImageId, K, MinSimilarity, Reader, ServiceDep, Sources, Threshold
from api.errors import ApiError, error_code, http_status
from api.routers.common import BINARY, SearchOptions, errors, ms, multipart, query_timings
from api.state import Service
from api.uploads import MULTIPART_HINT, media_type, read_form, read_json
from api.worker import BatchInfo
from indexer.analyze import Analysis, query_answer
from indexer.query_forms import QUERY_FORM_SCHEMA, QueryForm, embedding_answer, form_images
from search.answers import EmbeddingAnswer
from search.errors import InvalidImage, NotFound
from search.query import Searcher

router = APIRouter()

QUERY_BODY = multipart(
    {
        "file": {**BINARY, "description": "One image (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF or HEIC/HEIF)."},
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
# or a JSON body: exactly one of image_base64, embedding, url (indexer.query_forms), plus optional search options
QUERY_BODY["requestBody"]["content"]["application/json"] = {"schema": QUERY_FORM_SCHEMA}
QUERY_HINT = (
    "send multipart/form-data (field `file`, or `files`) or application/json with one of `image_base64`, "
    "`embedding`, `url`"
)


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


def embedding_result(ans: EmbeddingAnswer, show_paths: bool) -> schemas.EmbeddingResult:
    """An embedding query's answer; without the read_paths right its neighbours' paths are left out."""
    if not show_paths:
        for n in ans.nearest_unsafe:
            n.paths = None
    return schemas.EmbeddingResult.model_validate(ans.model_dump())


def parse_form(payload: object) -> QueryForm:
    """A JSON query body as QueryForm; 422 (with the validation details) for anything else."""
    try:
        return QueryForm.model_validate(payload)
    except ValidationError as e:
        errs = [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors(include_url=False)]
        raise RequestValidationError(errs) from None


def merged_options(
    form: QueryForm,
    k: int | None,
    source: Sequence[str] | None,
    min_similarity: float | None,
    threshold: float | None,
) -> SearchOptions:
    """The search options from the query parameters and the JSON body (each given at most once: 422 if both)."""
    params = {"k": k, "source": source or None, "min_similarity": min_similarity, "threshold": threshold}
    twice = [name for name, value in params.items() if value is not None and getattr(form, name) is not None]
    if twice:
        both = ", ".join(twice)
        raise ApiError(422, "invalid_request", f"{both} given as query parameter and in the JSON body: give it once")
    return SearchOptions.of(
        k if k is not None else form.k,
        source or form.source,
        min_similarity if min_similarity is not None else form.min_similarity,
        threshold if threshold is not None else form.threshold,
    )


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
    """Score images and find their nearest known-unsafe images, near-duplicates and PDQ matches.

    multipart/form-data: field `file` (one image) or `files` (several). application/json: exactly one of
    `image_base64` (a base64 string or a list of them), `embedding` (a vector of the store model's dimension: no
    model run, the answer holds `nearest_unsafe` and `near_duplicates` only) or `url` (fetched only when the server
    enables url queries, from allowlisted hosts); the search options may also be body keys (each given once).
    Per image, the fields `nsfw-index query --json` prints. When every image fails the answer is that image's
    error (400 corrupt, 413 too large, 415 not an accepted format); otherwise failed images are listed with their
    error among the results.
    """
    t0 = time.perf_counter()
    show = caller.can("read_paths")
    kind = media_type(request)
    if kind == "application/json":
        body = parse_form(await read_json(request))
        options = merged_options(body, k, source, min_similarity, threshold)
        if body.embedding is not None:
            return await _embedding_query(body, svc, options, show, t0)
        svc.query_searcher()  # 503 before fetching or decoding when the store belongs to another model
        svc.worker.check_capacity()  # and when the queue is full
        items = await run_in_threadpool(form_images, body, svc.settings)
        return await _image_query(items, [None] * len(items), svc, options, show, t0)
    if kind != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", f"expected multipart/form-data or application/json: {QUERY_HINT}")
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
    return await _image_query(
        [(u.filename or u.name, u.data) for u in uploads],
        [u.filename for u in uploads],
        svc,
        SearchOptions.of(k, source, min_similarity, threshold),
        show,
        t0,
    )


async def _image_query(
    items: list[tuple[str, bytes] | InvalidImage],
    filenames: list[str | None],
    svc: Service,
    options: SearchOptions,
    show: bool,
    t0: float,
) -> schemas.QueryResponse:
    """Images (name, bytes; one refused before decoding is its InvalidImage) through the worker: the same pool,
    caps and pixel budget for every form; then the answers, in order."""
    good = [it for it in items if not isinstance(it, InvalidImage)]
    done: list[Analysis | InvalidImage] = []
    info = BatchInfo(queue_ms=0.0, inference_ms=0.0, batch_images=0)
    if good:
        done, info = await svc.worker.analyze(good)
    results_of_good = iter(done)
    analyses = [it if isinstance(it, InvalidImage) else next(results_of_good) for it in items]
    failures = [a for a in analyses if isinstance(a, InvalidImage)]
    if len(failures) == len(analyses):
        raise failures[0]
    searcher = svc.query_searcher()

    def answer_all() -> list[schemas.QueryResult | schemas.QueryFailure | schemas.EmbeddingResult]:
        return [
            failure(a, name) if isinstance(a, InvalidImage) else answer(a, searcher, name, show, options)
            for a, name in zip(analyses, filenames, strict=True)
        ]

    ts = time.perf_counter()
    results = await run_in_threadpool(answer_all)
    return schemas.QueryResponse(
        results=results,
        model=svc.model_info,
        index=svc.index_summary(),
        timings=query_timings(info, time.perf_counter() - ts, t0),
    )


async def _embedding_query(
    body: QueryForm, svc: Service, options: SearchOptions, show: bool, t0: float
) -> schemas.QueryResponse:
    """An embedding against the stored vectors: no model run, so the loaded model may differ from the store's."""
    searcher = svc.query_searcher(require_model=False)
    dim = svc.identity.embedding_dim
    ts = time.perf_counter()
    ans = await run_in_threadpool(lambda: embedding_answer(body.embedding, searcher, dim, **options.kwargs()))
    return schemas.QueryResponse(
        results=[embedding_result(ans, show)],
        model=svc.store_model_info(),
        index=svc.index_summary(),
        timings=query_timings(BatchInfo(queue_ms=0.0, inference_ms=0.0, batch_images=0), time.perf_counter() - ts, t0),
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
