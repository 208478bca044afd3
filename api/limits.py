"""Request limits: the body cap, the server-wide body-bytes budget and body read timeouts (an ASGI middleware),
and the server-wide budget of pixels being decoded."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import RETRY_AFTER_BUSY, ApiError


class PixelBudget:
    """Pixels in flight (being decoded, or prepared and waiting for inference), server-wide. `claim` answers at once:
    413 for a request that could never fit, 503 with Retry-After while others hold too much; never waits."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_flight = 0
        self.peak = 0  # the most ever claimed at once (for tests and metrics)
        self._lock = threading.Lock()

    def claim(self, pixels: int) -> Callable[[], None]:
        """Take `pixels`; returns the function that gives them back (idempotent)."""
        if pixels > self.total:
            raise ApiError(
                413,
                "too_large",
                f"the images of this request decode to {pixels} pixels, more than the server's budget of "
                f"{self.total} (setting decode_pixel_budget): send fewer or smaller images",
            )
        with self._lock:
            if self.in_flight + pixels > self.total:
                busy = self.in_flight
                raise ApiError(
                    503,
                    "overloaded",
                    f"the server is decoding {busy} pixels of other requests (budget {self.total}); retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_BUSY)},
                )
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if not done.is_set():
                    done.set()
                    self.in_flight -= pixels

        return release


def _json_error(status: int, code: str, message: str) -> tuple[Message, Message]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class BodySizeLimit:
    """Answer 413 as soon as a request body passes `max_bytes`, 503 when bodies in flight would pass `budget` bytes
    server-wide, and 408 when a body read waits `idle_seconds` for a byte or the whole body takes `total_seconds`.

    A Content-Length above the cap is refused before anything is read, and one that does not fit the budget gets 503
    with Retry-After at once (its bytes are reserved until the request ends). Otherwise the bytes of `http.request`
    messages are counted as the app receives them (chunked uploads included); when the count passes a limit, or a
    read times out, the middleware sends the error itself, tells the app the client went away, and drops whatever
    the app tries to send after that. The app never sees more than `max_bytes` of body.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        *,
        budget: int | None = None,
        idle_seconds: float | None = None,
        total_seconds: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget
        self.idle_seconds = idle_seconds
        self.total_seconds = total_seconds
        self.in_flight = 0  # body bytes reserved or received by requests not finished (one event loop: no lock)
        self.timeouts = 0  # 408s sent (for tests and metrics)

    def _timed_out(self, why: str) -> tuple[Message, Message]:
        return _json_error(408, "request_timeout", f"the request body {why}; send the whole body promptly")

    def _over_budget(self) -> tuple[Message, Message]:
        start, body = _json_error(
            503,
            "overloaded",
            f"the server holds {self.in_flight} bytes of request bodies (budget {self.budget}, setting "
            "body_bytes_budget); retry shortly",
        )
        start["headers"].append((b"retry-after", str(RETRY_AFTER_BUSY).encode()))
        return start, body

    def _too_large(self) -> tuple[Message, Message]:
        return _json_error(
            413,
            "too_large",
            f"the request body is larger than the {self.max_bytes} byte limit (setting max_body_bytes)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and length is None:
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None:
            try:
                declared = int(length)
                if declared < 0:
                    raise ValueError
            except ValueError:
                for m in _json_error(400, "bad_request", "invalid Content-Length header"):
                    await send(m)
                return
            if declared > self.max_bytes:
                for m in self._too_large():
                    await send(m)
                return
        reserved = int(length) if length is not None else 0
        if self.budget is not None and reserved and self.in_flight + reserved > self.budget:
            for m in self._over_budget():
                await send(m)
            return
        self.in_flight += reserved
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_seconds if self.total_seconds is not None else None

        received = 0
        charged = reserved  # bytes this request holds of the budget
        rejected = False
        started = False
        body_done = False

        async def reject(messages: tuple[Message, Message]) -> Message:
            nonlocal rejected, started
            rejected = True
            if not started:
                started = True
                for m in messages:
                    await send(m)
            return {"type": "http.disconnect"}

        async def timed_receive() -> Message:
            if body_done or (self.idle_seconds is None and deadline is None):
                return await receive()
            wait = self.idle_seconds
            if deadline is not None:
                left = deadline - loop.time()
                wait = left if wait is None else min(wait, left)
            try:
                if wait is None or wait <= 0:
                    raise TimeoutError
                return await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                self.timeouts += 1
                total = deadline is not None and loop.time() >= deadline - 1e-3
                why = (
                    f"took longer than {self.total_seconds:g} s"
                    if total
                    else f"sent nothing for {self.idle_seconds:g} s"
                )
                return await reject(self._timed_out(why))

        async def limited_receive() -> Message:
            nonlocal received, charged, body_done
            if rejected:
                return {"type": "http.disconnect"}
            message = await timed_receive()
            if rejected:
                return message
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    return await reject(self._too_large())
                if received > charged:  # chunked: charge as it comes
                    self.in_flight += received - charged
                    charged = received
                    if self.budget is not None and self.in_flight > self.budget:
                        return await reject(self._over_budget())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # the 413 is already out: the app's own answer to the "disconnect" goes nowhere
            if message["type"] == "http.response.start":
                started = True
                if not body_done and (chunked or reserved):
                    # answered before the whole body came (an error on its first bytes): close the connection after
                    # the answer, so that a client still sending cannot hold it open with the rest
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise
            # the app failed on the cut-off body (a disconnect mid-parse): the client already has its error
        finally:
            self.in_flight -= charged
