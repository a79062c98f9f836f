"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status.

Every error a user can cause or meet goes through APIError; FastAPI's validation
errors (malformed JSON, wrong types) become 400s in the same shape; Starlette's
HTTP errors (unknown route, wrong method) keep their status (a 405's Allow lists
every method of the path, not only the first route's); anything else is
logged with its traceback and answered with a clean 500 that leaks nothing.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("gateway")

_PYDANTIC_TAG = re.compile(r"^([a-z-]+\[.*\]|float|int|str|bool|list|dict|none|constrained-\w+|function-\w+)$")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error", 504: "server_error"}


class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as (message, param): param is the field path without 'body'."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _PYDANTIC_TAG.match(str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """Every method some route of the app accepts on this path (Starlette's 405 names only the first route's)."""
    routes = request.app.routes
    return ", ".join(m for m in METHODS
                     if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into an OpenAI error object."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
        return error_response(exc.status_code, str(exc.detail), kind, None, None, headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error in the gateway; it has been logged", "server_error", None,
                              "internal_error")
