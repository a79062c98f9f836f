"""API keys: `Authorization: Bearer KEY` on /v1/* and /metrics when keys are configured.

A pure ASGI middleware, so it answers before the body is read (a wrong key gets
401 even with a malformed body) and never wraps streaming responses. The
presented key is compared with every configured key in constant time.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_response


def key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    """hmac.compare_digest against every key (no early exit)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


def protected(path: str) -> bool:
    return path == "/metrics" or path == "/v1" or path.startswith("/v1/")


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app, self.keys = app, tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None or not key_matches(token, self.keys):
            message = "missing API key (send Authorization: Bearer KEY)" if token is None else "invalid API key"
            response = error_response(401, message, "authentication_error", None, "invalid_api_key",
                                      {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
