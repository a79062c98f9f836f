"""Server-Sent Events plumbing: a response that always closes its generator, and disconnect polling.

A streaming client that goes away must cancel its request. Starlette cancels the
response task (ASGI < 2.4) or raises on the next write (ASGI >= 2.4); either way
SSEResponse closes the body generator, whose `finally` publishes the CancelMsg, and then
calls `on_close` (the updates generator's aclose: a body generator that never started
has no `finally` to run).
Before the response starts (and under ASGI >= 2.4, where nobody else listens),
DisconnectWatch lets the generation loop poll for the disconnect itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content, headers: dict[str, str] | None = None,
                 on_close: Callable[[], Awaitable[object]] | None = None):
        super().__init__(content, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
                if self.on_close is not None:  # the body generator may never have started (a client gone at once)
                    await self.on_close()


class DisconnectWatch:
    """Awaitable check `await watch()`: has the client gone? Turned off once Starlette listens itself."""

    def __init__(self, request: Request):
        self.request, self.active = request, True

    def response_started(self) -> None:
        version = self.request.scope.get("asgi", {}).get("spec_version", "2.0")
        self.active = tuple(map(int, version.split("."))) >= (2, 4)

    async def __call__(self) -> bool:
        return self.active and await self.request.is_disconnected()
