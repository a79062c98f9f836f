"""The gateway's limits, as raw ASGI middleware: request-body size (413) and in-flight requests (429).

BodyLimitMiddleware: a body over its route's limit (POST /v1/files has its own,
larger one: batch input files) gets 413 with an OpenAI error object. A declared
Content-Length over the limit is refused before the app runs; a chunked body is
counted as it arrives and refused once it passes the limit. Before answering, the
rest of the body is read and discarded (up to DRAIN_MAX_BYTES, within
DRAIN_TIMEOUT_S), so a client that sends its whole body before reading the reply
(httpx, requests) gets the 413 and not a reset connection; a client that sent
`Expect: 100-continue` (curl) has not sent the body and is answered at once. When
the body is not drained the reply says `Connection: close`.

AdmissionMiddleware: at most `max_inflight` generation requests (POST
/v1/completions and /v1/chat/completions) of this gateway at once, counted from
the moment the request reaches the app until its response (streamed or not) is
over, whatever ends it; past it, 429 at once with Retry-After.
"""

from __future__ import annotations

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response

FILES_PATH = "/v1/files"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
DRAIN_MAX_BYTES = 256 << 20  # a refused body larger than this is not read: the connection is closed
DRAIN_TIMEOUT_S = 30.0
MULTIPART_SLACK = 64 << 10  # an upload's body is its file plus the multipart framing and form fields


class BodyTooLarge(HTTPException):
    """Raised into the app when its body passes the limit (the 413 has been sent already)."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", []) if key == name), None)


def content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def drain(receive: Receive, budget: int, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Read and discard the rest of the request body; True once it all came (False: too much, too slow, gone)."""
    with anyio.move_on_after(timeout_s):
        while budget >= 0:
            message = await receive()
            if message["type"] != "http.request":
                return False
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return budget >= 0
    return False


class _Guard:
    """One request's receive/send wrappers: count body bytes, refuse once past the limit, then mute the app."""

    def __init__(self, owner: BodyLimitMiddleware, scope: Scope, receive: Receive, send: Send, limit: int):
        self.owner, self.scope, self._receive, self._send, self.limit = owner, scope, receive, send, limit
        self.received, self.refused, self.started = 0, False, False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                if not self.started:
                    self.refused = True
                    await self.owner.refuse(self.scope, self._receive, self._send, self.limit,
                                            unread=message.get("more_body", False))
                raise BodyTooLarge()
        return message

    async def send(self, message: Message) -> None:
        if self.refused:  # the app's own answer to BodyTooLarge: the 413 is out already
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, file_max_bytes: int, drain_max_bytes: int = DRAIN_MAX_BYTES):
        self.app, self.max_bytes, self.file_max_bytes = app, max_bytes, file_max_bytes
        self.drain_max_bytes = drain_max_bytes

    def limit(self, path: str) -> int:
        return self.file_max_bytes + MULTIPART_SLACK if path == FILES_PATH else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, length = self.limit(scope["path"]), content_length(scope)
        if length is not None and length > limit:  # refused before the app runs: nothing of the body read yet
            waits = (_header(scope, b"expect") or b"").lower() == b"100-continue"  # it has not sent the body
            await self.refuse(scope, receive, send, limit, unread=True,
                              may_drain=not waits and length <= self.drain_max_bytes)
            return
        guard = _Guard(self, scope, receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.refused:  # BodyTooLarge after the response started, or anything else: not ours
                raise

    async def refuse(self, scope: Scope, receive: Receive, send: Send, limit: int, unread: bool,
                     may_drain: bool = True) -> None:
        """413; first drain what the client is still sending (when allowed), else close the connection after."""
        clean = not unread or (may_drain and await drain(receive, self.drain_max_bytes))
        message = f"the request body is larger than this server's limit of {limit} bytes"
        response = error_response(413, message, "invalid_request_error", None, "request_too_large",
                                  None if clean else {"Connection": "close"})
        await response(scope, receive, send)


class Admission:
    """This gateway's generation requests in flight, against its limit."""

    def __init__(self, limit: int):
        self.limit, self.inflight, self.refused = limit, 0, 0

    def enter(self) -> bool:
        if self.inflight >= self.limit:
            self.refused += 1
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        self.inflight -= 1


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, admission: Admission, retry_after_s: int):
        self.app, self.admission, self.retry_after_s = app, admission, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.admission.enter():
            message = (f"this server is at its limit of {self.admission.limit} requests in flight; "
                       f"retry after {self.retry_after_s} s")
            response = error_response(429, message, "rate_limit_error", None, "too_many_requests",
                                      {"Retry-After": str(self.retry_after_s)})
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()
