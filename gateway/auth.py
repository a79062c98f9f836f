"""API keys: `Authorization: Bearer KEY` on /v1/*, /metrics and /dashboard/* when keys are configured.

The dashboard also accepts the key from its HttpOnly cookie (set by POST
/dashboard/login), since a browser cannot send a header when it navigates; a
page request without a key is redirected to the login form.

A pure ASGI middleware, so it answers before the body is read (a wrong key gets
401 even with a malformed body) and never wraps streaming responses. The
presented key is compared with every configured key in constant time.
"""

from __future__ import annotations

import hmac
from http.cookies import CookieError, SimpleCookie

from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_response


def key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    """hmac.compare_digest against every key (no early exit)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


COOKIE = "specpipe_key"


def protected(path: str) -> bool:
    if path == "/dashboard/login":
        return False
    return path in ("/metrics", "/v1", "/dashboard") or path.startswith(("/v1/", "/dashboard/"))


def presented_key(scope: Scope) -> str | None:
    """The Bearer token, else (dashboard paths only) the dashboard cookie."""
    cookie = None
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        if name == b"cookie" and scope["path"].startswith("/dashboard"):
            try:
                cookie = SimpleCookie(value.decode("latin-1")).get(COOKIE)
            except CookieError:
                cookie = None
    return cookie.value if cookie is not None else None


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app, self.keys = app, tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = presented_key(scope)
        if token is None and scope["path"] == "/dashboard":
            await RedirectResponse("/dashboard/login", status_code=303)(scope, receive, send)
            return
        if token is None or not key_matches(token, self.keys):
            message = "missing API key (send Authorization: Bearer KEY)" if token is None else "invalid API key"
            response = error_response(401, message, "authentication_error", None, "invalid_api_key",
                                      {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

