"""The request body cap, enforced while the body is read (Content-Length or not), as an ASGI middleware."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
    """Answer 413 as soon as a request body passes `max_bytes`.

    A Content-Length above the cap is refused before anything is read. Otherwise the bytes of `http.request`
    messages are counted as the app receives them (chunked uploads included); when the count passes the cap the
    middleware sends the 413 itself, tells the app the client went away, and drops whatever the app tries to send
    after that. The app never sees more than `max_bytes` of body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
                break
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

        received = 0
        rejected = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, rejected, started
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    if not started:
                        started = True
                        for m in self._too_large():
                            await send(m)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # the 413 is already out: the app's own answer to the "disconnect" goes nowhere
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise
            # the app failed on the cut-off body (a disconnect mid-parse): the client already has its 413
