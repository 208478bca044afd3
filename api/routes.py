"""The routes: HTTP to `indexer`/`search` calls and back (searches in a threadpool, inference via the worker)."""

from __future__ import annotations

import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from api import schemas
from api.auth import Caller, require
from api.errors import ApiError, error_code, http_status
from api.state import Service
from api.uploads import MULTIPART_HINT, read_form
from api.worker import BatchInfo
from indexer.analyze import Analysis, query_answer
from search.errors import InvalidArgument, InvalidImage, ModelMismatch, NotFound
from search.query import Searcher

_ROUTES: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []


def _route(method: str, path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record a route; `add_routes` puts them on the app itself (flat in `app.routes`, not an included router)."""

    def record(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        _ROUTES.append((path, endpoint, {"methods": [method], **options}))
        return endpoint

    return record


def add_routes(app: FastAPI) -> None:
    for path, endpoint, options in _ROUTES:
        app.add_api_route(path, endpoint, **options)


#: Seconds an HTTP add waits for the store's writer lock (held by an `nsfw-index index` run) before a 503.
WRITE_LOCK_TIMEOUT = 5.0
MAX_BAD_LINES_SHOWN = 1000
MAX_ID = 2**63 - 1


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": schemas.ErrorResponse} for s in statuses}


def _multipart(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_BINARY = {"type": "string", "format": "binary"}
QUERY_BODY = _multipart(
    {
        "file": {**_BINARY, "description": "One image (JPEG, PNG, WebP, GIF, BMP or TIFF)."},
        "files": {"type": "array", "items": _BINARY, "description": "Several images, answered in order."},
    }
)
ADD_BODY = _multipart({"file": {**_BINARY, "description": "The image to add to the index."}}, ["file"])
HASH_LIST_BODY = _multipart(
    {
        "file": {**_BINARY, "description": "One PDQ hash (64 hex) per line, or a CSV with a `hash` column."},
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "description": "The list's name."},
    },
    ["file", "name"],
)

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


def service(request: Request) -> Service:
    svc: Service | None = getattr(request.app.state, "service", None)
    if svc is None:
        raise ApiError(503, "not_ready", "the server is starting")
    return svc


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _strip_paths(rows: list[dict[str, Any]], show: bool) -> None:
    """Without the read_paths right, `paths` keys are removed (the response then leaves the field out)."""
    if not show:
        for row in rows:
            row.pop("paths", None)


def _failure(e: InvalidImage, filename: str | None) -> dict[str, Any]:
    return {"filename": filename, "status": http_status(e)[0], "error": {"code": error_code(e), "message": str(e)}}


def _answer(
    a: Analysis, searcher: Searcher | None, filename: str | None, show_paths: bool, params: dict[str, Any]
) -> dict[str, Any]:
    ans = query_answer(a, searcher, **params)
    ans.setdefault("indexed_id", None)
    ans["filename"] = filename
    _strip_paths(ans["nearest_unsafe"], show_paths)
    return ans


def _timings(info: BatchInfo, search_s: float, t0: float) -> dict[str, Any]:
    return {
        "queue_ms": round(info.queue_ms, 3),
        "inference_ms": round(info.inference_ms, 3),
        "batch_images": info.batch_images,
        "search_ms": _ms(search_s),
        "total_ms": _ms(time.perf_counter() - t0),
    }


def _search_params(
    k: int | None, source: Sequence[str] | None, min_similarity: float | None, threshold: float | None
) -> dict[str, Any]:
    return {
        "k": k,
        "sources": list(source) if source else None,
        "min_similarity": min_similarity,
        "threshold": threshold,
    }


# -- queries ---------------------------------------------------------------------------------------------------------
@_route(
    "POST",
    "/v1/query",
    response_model=schemas.QueryResponse,
    openapi_extra=QUERY_BODY,
    tags=["query"],
    responses=_errors(400, 401, 403, 413, 415, 422, 503),
)
async def query(
    request: Request,
    caller: Annotated[Caller, Depends(require("read"))],
    k: K = None,
    source: Sources = None,
    min_similarity: MinSimilarity = None,
    threshold: Threshold = None,
) -> dict[str, Any]:
    """Score uploaded images and find their nearest known-unsafe images, near-duplicates and PDQ matches.

    Multipart field `file` (one image) or `files` (several). Per image, the fields `nsfw-index query --json`
    prints. When every image fails the answer is that image's error (400 corrupt, 413 too large, 415 not an
    accepted format); otherwise failed images are listed with their error among the results.
    """
    t0 = time.perf_counter()
    svc = service(request)
    svc.query_searcher()  # 503 before reading the body when the store belongs to another model
    svc.worker.check_capacity()  # and when the queue is full
    form = await read_form(request)
    uploads = form.files("file", "files")
    if not uploads:
        raise ApiError(422, "invalid_request", f"no image in the request: {MULTIPART_HINT}")
    analyses, info = await svc.worker.analyze([(u.filename or u.name, u.data) for u in uploads])
    failures = [a for a in analyses if isinstance(a, InvalidImage)]
    if len(failures) == len(analyses):
        raise failures[0]
    searcher = svc.query_searcher()
    params = _search_params(k, source, min_similarity, threshold)
    show = caller.can("read_paths")

    def answer_all() -> list[dict[str, Any]]:
        return [
            _failure(a, u.filename) if isinstance(a, InvalidImage) else _answer(a, searcher, u.filename, show, params)
            for a, u in zip(analyses, uploads, strict=True)
        ]

    ts = time.perf_counter()
    results = await run_in_threadpool(answer_all)
    return {
        "results": results,
        "model": svc.model_info,
        "index": svc.index_summary(),
        "timings": _timings(info, time.perf_counter() - ts, t0),
    }


@_route(
    "GET",
    "/v1/images/{id}/neighbours",
    response_model=schemas.NeighboursResponse,
    tags=["query"],
    responses=_errors(401, 403, 404, 422, 503),
)
async def neighbours(
    request: Request,
    image_id: ImageId,
    caller: Annotated[Caller, Depends(require("read"))],
    k: K = None,
    source: Sources = None,
    min_similarity: MinSimilarity = None,
    threshold: Threshold = None,
) -> dict[str, Any]:
    """The query answer for an indexed image, from its stored embedding: no model run, it leaves itself out."""
    t0 = time.perf_counter()
    svc = service(request)
    searcher = svc.query_searcher(require_model=False)
    if searcher is None:
        raise NotFound(f"no image with id {image_id}: the store has no images yet")
    params = _search_params(k, source, min_similarity, threshold)
    ans = await run_in_threadpool(searcher.neighbours, image_id, **params)
    show = caller.can("read_paths")
    _strip_paths(ans["nearest_unsafe"], show)
    _strip_paths([ans["exact_duplicates"]], show)
    ident = svc.store_identity or svc.model_info
    ans["model"] = {"architecture": ident["architecture"], "weights_sha256": ident["weights_sha256"]}
    ans["timings"] = {"search_ms": _ms(time.perf_counter() - t0), "total_ms": _ms(time.perf_counter() - t0)}
    return ans


# -- images ----------------------------------------------------------------------------------------------------------
@_route(
    "GET",
    "/v1/images/{id}",
    response_model=schemas.ImageResponse,
    tags=["images"],
    responses=_errors(401, 403, 404, 422, 503),
)
async def get_image(
    request: Request, image_id: ImageId, caller: Annotated[Caller, Depends(require("read"))]
) -> dict[str, Any]:
    """One indexed image: scores, PDQ, known-unsafe sources and its label history (no file is ever served)."""
    svc = service(request)
    settings = svc.settings
    show = caller.can("read_paths")

    def read() -> dict[str, Any]:
        with svc.read_store() as store:
            row = store.image(image_id)
            paths = store.paths_of([image_id])[image_id]
            sources = store.sources_of([image_id], settings)[image_id]
            history = store.label_history(image_id)
        current = history[-1]["label"] if history else None
        out = {
            **row,
            "is_nsfw": row["scores"][settings.nsfw_level] >= settings.nsfw_threshold,
            "known_unsafe_sources": sources,
            "label": None if current == "clear" else current,
            "labels": history,
            "path_count": len(paths),
        }
        if show:
            out["paths"] = paths
        return out

    return await run_in_threadpool(read)


@_route(
    "POST",
    "/v1/images",
    response_model=schemas.AddResponse,
    openapi_extra=ADD_BODY,
    tags=["images"],
    responses=_errors(400, 401, 403, 409, 413, 415, 422, 503),
)
async def add_image(request: Request, caller: Annotated[Caller, Depends(require("write"))]) -> dict[str, Any]:
    """Add an uploaded image (multipart field `file`) to the index; answers with its id and its query answer.

    Committed to the store before the answer (it survives a crash), and visible to the next query. The upload is
    recorded under the path `upload://SHA256`; nothing the client sent is stored as a path.
    """
    from indexer.service import add_image as engine_add

    t0 = time.perf_counter()
    svc = service(request)
    if svc.mismatch:
        raise ApiError(409, "model_mismatch", svc.mismatch)
    svc.worker.check_capacity()
    form = await read_form(request)
    uploads = form.files("file", "files")
    if len(uploads) != 1:
        raise ApiError(422, "invalid_request", "send exactly one image, in multipart field `file`")
    upload = uploads[0]
    analyses, info = await svc.worker.analyze([(upload.filename or upload.name, upload.data)])
    analysis = analyses[0]
    if isinstance(analysis, InvalidImage):
        raise analysis
    try:
        image_id, created = await run_in_threadpool(
            engine_add, svc.store_dir, svc.extractor, svc.settings, analysis, lock_timeout=WRITE_LOCK_TIMEOUT
        )
    except ModelMismatch as e:
        raise ApiError(409, "model_mismatch", str(e)) from None
    await run_in_threadpool(svc.refresh_now)
    searcher = svc.query_searcher()
    ts = time.perf_counter()
    result = await run_in_threadpool(
        _answer, analysis, searcher, upload.filename, caller.can("read_paths"), _search_params(None, None, None, None)
    )
    return {
        "id": image_id,
        "created": created,
        "result": result,
        "model": svc.model_info,
        "timings": _timings(info, time.perf_counter() - ts, t0),
    }


def _clean_who(who: str | None) -> str | None:
    if who is None:
        return None
    text = "".join(c for c in unicodedata.normalize("NFC", who) if c.isprintable()).strip()
    return " ".join(text.split())[:100] or None


@_route(
    "PUT",
    "/v1/images/{id}/label",
    response_model=schemas.LabelResponse,
    tags=["images"],
    responses=_errors(401, 403, 404, 413, 422, 503),
)
async def label_image(
    request: Request,
    image_id: ImageId,
    body: Annotated[schemas.LabelRequest, Body()],
    caller: Annotated[Caller, Depends(require("label"))],
) -> dict[str, Any]:
    """Label an image unsafe or safe (or clear the label): an event appended to the store's label log.

    The event's `who` is the API key's identity, followed by the body's `who` (a reviewer name) if given.
    Committed before the answer, and visible to the next query.
    """
    from search.labels import label_images

    svc = service(request)
    who = caller.name + (f"/{w}" if (w := _clean_who(body.who)) else "")

    def write() -> dict[str, Any]:
        with svc.read_store() as store:
            store.image(image_id)  # 404 before anything is written (and never a path lookup by accident)
        return label_images(svc.store_dir, [str(image_id)], body.label, svc.settings, who=who, reason=body.reason)[0]

    event = await run_in_threadpool(write)
    await run_in_threadpool(svc.refresh_now)

    def sources() -> list[str]:
        with svc.read_store() as store:
            return store.sources_of([image_id], svc.settings)[image_id]

    return {
        "id": image_id,
        "label": event["label"],
        "event": event["event"],
        "who": event["who"],
        "at": event["at"],
        "known_unsafe_sources": await run_in_threadpool(sources),
    }


# -- hash lists ------------------------------------------------------------------------------------------------------
@_route(
    "POST",
    "/v1/hash-lists",
    response_model=schemas.HashListResponse,
    openapi_extra=HASH_LIST_BODY,
    tags=["hash lists"],
    responses=_errors(400, 401, 403, 413, 415, 422, 503),
)
async def import_hashes(
    request: Request,
    caller: Annotated[Caller, Depends(require("write"))],
    replace: Annotated[bool, Query(description="Replace the list of that name.")] = False,
) -> dict[str, Any]:
    """Import a PDQ hash list (multipart `file` and `name`); every indexed image is matched against it.

    Lines that hold no valid hash are reported in `bad_lines`, not fatal.
    """
    from search.labels import import_hash_list

    svc = service(request)
    form = await read_form(request)
    files = form.files("file")
    name = (form.field("name") or "").strip()
    if len(files) != 1 or not name or len(name) > 200:
        raise ApiError(
            422,
            "invalid_request",
            "send the list in multipart field `file` and its name (1 to 200 characters) in field `name`",
        )
    data = files[0].data

    def work() -> dict[str, Any]:
        # the parser reads files: the list (not an image) goes to a private temporary file, removed at once
        with tempfile.TemporaryDirectory(prefix="nsfw-index-hashes-") as tmp:
            path = Path(tmp) / "list.txt"
            path.write_bytes(data)
            try:
                return import_hash_list(
                    svc.store_dir, path, name, svc.settings, replace=replace, source=f"http-upload by {caller.name}"
                )
            except InvalidArgument as e:  # name the upload, not the temporary file
                raise InvalidArgument(str(e).replace(str(path), repr(files[0].filename or "the upload"))) from None

    out = await run_in_threadpool(work)
    await run_in_threadpool(svc.refresh_now)
    bad = out["bad_lines"]
    out["bad_line_count"] = len(bad)
    out["bad_lines"] = [{**b, "text": str(b["text"])[:200]} for b in bad[:MAX_BAD_LINES_SHOWN]]
    return out


# -- clusters --------------------------------------------------------------------------------------------------------
def _clusters_module() -> Any:
    try:
        import search.clusters as clusters
    except ImportError as e:
        raise ApiError(503, "unavailable", f"clustering is not available in this build ({e})") from None
    return clusters


@_route(
    "GET", "/v1/clusters", response_model=schemas.ClusterPage, tags=["clusters"], responses=_errors(401, 403, 422, 503)
)
async def list_clusters(
    request: Request,
    caller: Annotated[Caller, Depends(require("read"))],
    kind: Annotated[
        Literal["cluster", "group"], Query(description="k-means clusters or near-duplicate groups.")
    ] = "cluster",
    sort: Annotated[Literal["size", "unsafe"], Query()] = "size",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Clusters or near-duplicate groups from the last `nsfw-index cluster` run, largest or most unsafe first."""
    svc = service(request)

    def read() -> dict[str, Any]:
        clusters = _clusters_module()
        with svc.read_store() as store:
            out: dict[str, Any] = clusters.list_clusters(
                store, svc.settings, kind=kind, sort=sort, page=page, per_page=per_page
            )
        return out

    return await run_in_threadpool(read)


@_route(
    "GET",
    "/v1/clusters/{id}",
    response_model=schemas.ClusterDetail,
    tags=["clusters"],
    responses=_errors(401, 403, 404, 422, 503),
)
async def get_cluster(
    request: Request,
    cluster_id: Annotated[int, PathParam(alias="id", ge=0, le=MAX_ID)],
    caller: Annotated[Caller, Depends(require("read"))],
    limit: Annotated[int, Query(ge=0, le=100_000, description="Members to list.")] = 1000,
) -> dict[str, Any]:
    """One cluster or group with its members (ids, scores, known-unsafe sources)."""
    svc = service(request)

    def read() -> dict[str, Any]:
        clusters = _clusters_module()
        with svc.read_store() as store:
            out: dict[str, Any] = clusters.get_cluster(store, svc.settings, cluster_id, limit=limit)
        return out

    out = await run_in_threadpool(read)
    _strip_paths(out.get("members", []), caller.can("read_paths"))
    return out


# -- store and service -----------------------------------------------------------------------------------------------
@_route("GET", "/v1/stats", response_model=schemas.StatsResponse, tags=["store"], responses=_errors(401, 403, 422, 503))
async def stats(
    request: Request,
    caller: Annotated[Caller, Depends(require("read"))],
    recall_sample: Annotated[
        int,
        Query(
            ge=0,
            le=10_000,
            description=("Queries used to measure recall@10 of an approximate index (0: skip; it reads the index)."),
        ),
    ] = 0,
) -> dict[str, Any]:
    """Counts, levels, known-unsafe, labels, hash lists, index freshness and the store's model identity."""
    from search.stats import store_stats

    svc = service(request)
    return await run_in_threadpool(store_stats, svc.store_dir, svc.settings, recall_sample=recall_sample)


@_route("GET", "/healthz", response_model=schemas.HealthResponse, tags=["service"])
async def healthz() -> dict[str, Any]:
    """Liveness: answers at once, touching nothing that inference or search hold."""
    return {"status": "ok"}


@_route("GET", "/readyz", response_model=schemas.ReadyResponse, tags=["service"], responses=_errors(503))
async def readyz(request: Request) -> dict[str, Any]:
    """Readiness: 503 while the model or the index is not loaded, or the index does not match the store."""
    svc = service(request)
    if svc.not_ready is not None:
        raise ApiError(503, "model_mismatch" if svc.mismatch else "not_ready", svc.not_ready)
    return {"ready": True, "model": svc.model_info, "index": svc.index_summary()}
