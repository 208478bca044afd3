"""Request bodies read in memory: multipart/form-data with python-multipart's streaming parser, and JSON bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError

#: Parts (files and fields) one request may carry.
MAX_PARTS = 64
#: A non-file form field (e.g. a hash list's name) larger than this is refused.
MAX_FIELD_BYTES = 64 * 1024

MULTIPART_HINT = "send multipart/form-data with the image in field `file` (or several images in `files`)"


@dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


@dataclass
class Form:
    parts: list[Part] = field(default_factory=list)

    def files(self, *names: str) -> list[Part]:
        """Parts named one of `names`, in upload order."""
        return [p for p in self.parts if p.name in names]

    def field(self, name: str) -> str | None:
        for p in self.parts:
            if p.name == name and p.filename is None:
                return p.data.decode("utf-8", "replace")
        return None


class _Collector:
    """python-multipart callbacks that keep each part in a bytearray (the body is already capped by BodySizeLimit)."""

    def __init__(self, max_parts: int) -> None:
        self.max_parts = max_parts
        self.form = Form()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name = ""
        self._filename: str | None = None
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._data = bytearray()
        if len(self.form.parts) >= self.max_parts:
            raise ApiError(422, "invalid_request", f"at most {self.max_parts} parts (files and fields) per request")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name = bytearray()
        self._header_value = bytearray()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition.decode("latin-1"))
        if b"name" not in options:
            raise ApiError(400, "bad_request", "a multipart part has no Content-Disposition name")
        self._name = options[b"name"].decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if self._filename is None and len(self._data) > MAX_FIELD_BYTES:
            raise ApiError(413, "too_large", f"form field {self._name!r} is larger than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        self.form.parts.append(Part(self._name, self._filename, bytes(self._data)))
        self._data = bytearray()


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case ('' when none)."""
    content_type, _ = parse_options_header(request.headers.get("content-type"))
    return content_type.decode("latin-1").lower()


async def read_json(request: Request) -> Any:
    """The request body as JSON (already capped by BodySizeLimit); 422 for a body that is not UTF-8 JSON."""
    try:
        body = await request.body()
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the body ended before it was complete") from None

    def parse() -> Any:
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ApiError(422, "invalid_request", f"the body is not valid JSON text (UTF-8): {e}") from None

    return await run_in_threadpool(parse)


async def read_form(request: Request, *, max_parts: int = MAX_PARTS) -> Form:
    """Parse the request body as multipart/form-data, in memory, as it streams in."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type", f"expected multipart/form-data: {MULTIPART_HINT}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary parameter")
    collector = _Collector(max_parts)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": collector.on_part_begin,
                "on_part_data": collector.on_part_data,
                "on_part_end": collector.on_part_end,
                "on_header_field": collector.on_header_field,
                "on_header_value": collector.on_header_value,
                "on_header_end": collector.on_header_end,
                "on_headers_finished": collector.on_headers_finished,
            },
        )
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
    except FormParserError as e:
        raise ApiError(400, "bad_request", f"malformed multipart body: {e}") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the body ended before it was complete") from None
    if parser.state != MultipartState.END:
        raise ApiError(400, "bad_request", "the multipart body ends before its closing boundary")
    return collector.form
