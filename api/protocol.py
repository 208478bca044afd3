"""uvicorn's h11 protocol with JSON errors at the connection level: malformed requests (400), incomplete request
headers (408) and connections past the cap (503), plus the uvicorn options `serve` runs with."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.errors import RETRY_AFTER_BUSY
from search.settings import Settings

_PHRASES = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def _raw_error(status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A whole HTTP/1.1 response with the JSON error body, for writing straight to the socket."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *(extra or []),
    ]
    head = b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES[status]) + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n" + body


class JsonH11Protocol(H11Protocol):
    """H11Protocol whose own answers are JSON errors like the app's. Class attributes set by `protocol_for`."""

    max_connections: int | None = None
    header_seconds: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._abort(
                503,
                "overloaded",
                f"the server has {self.max_connections} connections open (setting max_connections); retry shortly",
                [(b"retry-after", str(RETRY_AFTER_BUSY).encode())],
            )
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self.header_seconds is not None:
            self._header_timer = self.loop.call_later(self.header_seconds, self._header_timeout)

    def _header_timeout(self) -> None:
        # only while no complete request head has arrived: a request being answered, or idle between requests
        # (uvicorn's keep-alive timeout), is not ours to end
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE and self._partial_head():
            self._abort(408, "request_timeout", f"the request headers took longer than {self.header_seconds:g} s")

    def _partial_head(self) -> bool:
        # h11 holds what it has received of a request head it cannot parse yet; nothing at all is an idle connection,
        # which uvicorn's keep-alive timeout closes (a first request that never starts is closed here too)
        return bool(self.conn.trailing_data[0]) or self.cycle is None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._abort(
            400, "bad_request", f"malformed HTTP request ({msg.rstrip('.')}): check the request line and headers"
        )

    def _abort(self, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.transport.write(_raw_error(status, code, message, extra))
        self.transport.close()


def protocol_for(settings: Settings) -> type[JsonH11Protocol]:
    """The protocol class for uvicorn's `http=` with this server's connection cap and header timeout."""
    return type(
        "NsfwIndexH11Protocol",
        (JsonH11Protocol,),
        {"max_connections": settings.max_connections, "header_seconds": settings.header_seconds},
    )


def server_options(settings: Settings | None) -> dict[str, Any]:
    """uvicorn.Config keyword arguments: the JSON-error protocol with the settings' limits (none without settings)."""
    if settings is None:
        return {}
    return {"http": protocol_for(settings), "h11_max_incomplete_event_size": 16 * 1024}
