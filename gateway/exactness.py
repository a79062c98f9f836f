"""Whether outputs are exact: every reply carries the stages' attention kind.

With DistrAttention (approximate prefill attention) outputs may differ from
the model's exact decoding; the API says so on every response, /v1/models says
so in the model card and the dashboard shows a banner.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class AttentionHeaderMiddleware:
    """Every reply says which attention the stages run: `X-SpecPipe-Attention: exact` (lossless) or
    `distr; approximate` (DistrAttention prefill: outputs may differ from the model's exact decoding)."""

    def __init__(self, app: ASGIApp, kind: str):
        self.app = app
        self.value = b"exact" if kind == "exact" else f"{kind}; approximate".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-specpipe-attention", self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)
