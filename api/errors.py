"""The only place errors become HTTP: NsfwIndexError subclasses, routing and validation errors -> JSON error bodies."""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from search.errors import InvalidArgument, InvalidImage, NotFound, NsfwIndexError, StoreLocked

log = logging.getLogger(__name__)

#: Seconds a client should wait before retrying a 503 (store busy, queue full).
RETRY_AFTER_BUSY = 1
RETRY_AFTER_LOCKED = 5

_IMAGE_KINDS: dict[str, tuple[int, str]] = {
    "invalid": (400, "invalid_image"),
    "too_large": (413, "too_large"),
    "unsupported_format": (415, "unsupported_format"),
}

#: FastAPI's detail when reading a JSON body fails other than by a JSON syntax error (it answers those 422 itself).
_BODY_PARSE_ERROR = "There was an error parsing the body"

_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """An HTTP error raised by the adapter itself (auth, limits, overload, request shape)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


def http_status(e: NsfwIndexError) -> tuple[int, dict[str, str]]:
    """The status (and headers) an engine error maps to."""
    if isinstance(e, InvalidImage):
        return _IMAGE_KINDS.get(e.kind, (400, ""))[0], {}
    if isinstance(e, NotFound):
        return 404, {}
    if isinstance(e, InvalidArgument):
        return 422, {}
    if isinstance(e, StoreLocked):
        return 503, {"Retry-After": str(RETRY_AFTER_LOCKED)}
    # the server's own state: another model (a write route answers 409 itself), a missing, damaged or
    # mismatched store or index, an unloadable model
    return 503, {}


def error_code(e: NsfwIndexError) -> str:
    if isinstance(e, InvalidImage):
        return _IMAGE_KINDS.get(e.kind, (400, "invalid_image"))[1]
    return e.code


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _validation_details(errors: Any) -> list[dict[str, Any]]:
    out = []
    for err in list(errors)[:50]:
        # the offending input is left out: it can be large, and it is the caller's own
        out.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


def install_handlers(app: FastAPI, redact: Callable[[str], str]) -> None:
    """JSON `{"error": {"code", "message"}}` for every error, including 404 on unknown routes, 405 and 422."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, redact(exc.message), headers=exc.headers, details=exc.details)

    @app.exception_handler(NsfwIndexError)
    async def _engine_error(request: Request, exc: NsfwIndexError) -> JSONResponse:
        status, headers = http_status(exc)
        return error_response(status, error_code(exc), redact(str(exc)), headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 400 and exc.detail == _BODY_PARSE_ERROR:  # FastAPI's own, for a JSON body it cannot read
            return error_response(
                422, "invalid_request", "the body is not valid JSON text (UTF-8): send the documented JSON object"
            )
        if status == 404 and exc.detail == HTTPStatus.NOT_FOUND.phrase:
            message = f"no route {request.method} {request.url.path}: the API is under /v1, see /openapi.json"
        elif status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
        return error_response(status, _STATUS_CODES.get(status, "error"), message, headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc.errors())
        where = ".".join(details[0]["loc"]) if details else ""
        msg = str(details[0]["msg"]) if details else "invalid request"
        return error_response(422, "invalid_request", f"{where}: {msg}" if where else msg, details=details)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, in JSON, without detail
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error (logged on the server)")
