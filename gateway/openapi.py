"""The gateway's OpenAPI document, made to say what the gateway really answers.

FastAPI's generated spec declares a 422 that the gateway never sends (validation
errors are 400s) and only the 200 of each route. `install_openapi` post-processes
it once: 422 removed; the error statuses each route can answer added with
OpenAI's error object (400 bad input, 401 bad key on /v1/* and /metrics, 404
unknown model/request/file/batch, 413 body too large (every operation with a
body), 429 queue full or too many in flight, with Retry-After, 503 not
ready / Redis unreachable, 499 cancelled, 504 timeout); the media types of non-JSON replies
(SSE streams, Prometheus text, JSONL files) declared; numeric bounds that
pydantic writes as ge/le/gt/lt on a union renamed to JSON Schema's keywords;
request examples for the generation endpoints. schemathesis checks the
live gateway against this document (tests/gateway/test_schema.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.auth import protected

GENERATION = ("/v1/completions", "/v1/chat/completions")
USES_REDIS = ("/ready", "/v1/requests/", "/v1/files", "/v1/batches")
METRICS_MEDIA = ("text/plain", "application/openmetrics-text")  # the latter when the Accept header asks for it
DESCRIPTIONS = {
    400: "Invalid request (malformed JSON, a bad or unsupported parameter, context length exceeded)",
    401: "Missing or invalid API key (when keys are configured)",
    404: "Unknown model, request, file or batch",
    413: "The request body is larger than the server's limit (--max-body-bytes; --max-file-bytes for uploads)",
    429: "The scheduler's queue is full, or this gateway has --max-inflight requests in flight; retry after "
         "Retry-After seconds",
    503: "The pipeline is not ready, or Redis is not reachable",
    499: "The request was cancelled (POST /v1/requests/{id}/cancel) before it completed",
    504: "The request did not complete within the gateway's timeout (it was cancelled)",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object."""

    error: ErrorDetail


def error_statuses(path: str, method: str, op: dict[str, Any]) -> list[int]:
    """The error statuses an operation can answer."""
    statuses = []
    if op.get("parameters") or op.get("requestBody"):
        statuses.append(400)
    if op.get("requestBody"):
        statuses.append(413)
    if protected(path):
        statuses.append(401)
    if "{" in path or path in GENERATION or (path, method) == ("/v1/batches", "post"):  # model / input file
        statuses.append(404)
    if path in GENERATION:
        statuses += [429, 499, 503, 504]
    elif path.startswith(USES_REDIS):
        statuses.append(503)
    return statuses


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    if status == 429:
        response["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}
    return response


def _media_types(path: str, responses: dict[str, Any]) -> None:
    ok = responses.get("200")
    if ok is None:
        return
    if path in GENERATION:
        ok.setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT}
    elif path == "/metrics":
        ok["content"] = {media: {"schema": {"type": "string"}} for media in METRICS_MEDIA}


EXAMPLES = {
    "/v1/completions": {"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 2, "temperature": 0},
}
SSE_EVENT = {  # one Server-Sent Event of a `stream: true` reply
    "type": "object", "required": ["data"],
    "description": "One event per token group: `data` is a chunk object as JSON (or an error object); the last "
                   "event's data is [DONE]",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
}
_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _standard_keywords(node: Any) -> None:
    """pydantic writes a Field's bounds on a union as ge/le/gt/lt: make them JSON Schema keywords."""
    if isinstance(node, dict):
        if "anyOf" in node:
            for short, keyword in _KEYWORDS.items():
                if short in node:
                    node[keyword] = node.pop(short)
        for value in node.values():
            _standard_keywords(value)
    elif isinstance(node, list):
        for value in node:
            _standard_keywords(value)


def _examples(path: str, op: dict[str, Any]) -> None:
    body = op.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None and path in EXAMPLES:
        body["examples"] = {"full": {"value": EXAMPLES[path]},
                            "stream": {"value": {**EXAMPLES[path], "stream": True}}}


def patch(schema: dict[str, Any]) -> dict[str, Any]:
    """Fix up a FastAPI-generated OpenAPI document in place (see the module docstring)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _standard_keywords(components)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in error_statuses(path, method, op):
                responses.setdefault(str(status), _error_response(status))
            _media_types(path, responses)
            _examples(path, op)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the patched document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = patch(get_openapi(title=app.title, version=app.version, routes=app.routes,
                                                   description=app.description))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
