"""Batch input files: the JSONL format, checked line by line before anything runs.

Each non-blank line is one request:
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
`custom_id` is a non-empty string unique in the file; `body` must be a valid
request for `url` (the same pydantic models and unsupported-field check as the
HTTP endpoints; `stream` is not allowed). Problems that depend on the served
model (unknown model, context length) are per-line errors at run time, as in
OpenAI's Batch API. Any problem here is a 400 whose message names the line
(1-based, counting blank lines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gateway.errors import APIError
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

ENDPOINTS: dict[str, type[SamplingRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINES = 50_000
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class BatchLine:
    index: int  # position among the requests (0-based, blank lines skipped)
    line_no: int  # physical line in the file (1-based), for messages
    custom_id: str
    url: str
    body: dict[str, Any]


def _bad(line_no: int, message: str) -> APIError:
    return APIError(400, f"line {line_no}: {message}", param="file", code="invalid_batch_line")


def _validation_text(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "constrained-")))
    return f"body.{loc}: {first.get('msg')}" if loc else f"body: {first.get('msg')}"


def parse_line(text: str, line_no: int, index: int) -> BatchLine:
    """One JSONL line -> BatchLine; 400 naming the line for anything wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(line_no, f"not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise _bad(line_no, "each line must be a JSON object")
    custom_id, method, url, body = obj.get("custom_id"), obj.get("method"), obj.get("url"), obj.get("body")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise _bad(line_no, f"'custom_id' must be a non-empty string of at most {MAX_CUSTOM_ID} characters")
    if method != "POST":
        raise _bad(line_no, "'method' must be \"POST\"")
    if url not in ENDPOINTS:
        raise _bad(line_no, f"'url' must be one of {', '.join(ENDPOINTS)}")
    if not isinstance(body, dict):
        raise _bad(line_no, "'body' must be a JSON object")
    check_body(url, body, line_no)
    return BatchLine(index, line_no, custom_id, url, body)


def check_body(url: str, body: dict[str, Any], line_no: int) -> SamplingRequest:
    """The request body as the HTTP endpoint would parse it (plus: no streaming in a batch)."""
    try:
        req = ENDPOINTS[url].model_validate(body)
    except ValidationError as exc:
        raise _bad(line_no, _validation_text(exc)) from None
    field = req.unsupported()
    if field is not None:
        raise _bad(line_no, f"body.{field} is not supported by this server")
    if req.stream:
        raise _bad(line_no, "body.stream: streaming is not supported in a batch")
    return req


def parse_jsonl(data: bytes) -> list[BatchLine]:
    """Every request of a batch input file, validated; 400 naming the first bad line."""
    if len(data) > MAX_FILE_BYTES:
        raise APIError(400, f"the file is larger than {MAX_FILE_BYTES} bytes", param="file", code="file_too_large")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the file is not UTF-8 (byte {exc.start})", param="file", code="invalid_file") from None
    lines, seen = [], {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = parse_line(raw, line_no, len(lines))
        if line.custom_id in seen:
            raise _bad(line_no, f"duplicate custom_id '{line.custom_id}' (first on line {seen[line.custom_id]})")
        seen[line.custom_id] = line_no
        lines.append(line)
        if len(lines) > MAX_LINES:
            raise _bad(line_no, f"a batch holds at most {MAX_LINES} requests")
    if not lines:
        raise APIError(400, "the file has no requests", param="file", code="invalid_file")
    return lines


def check_endpoint(lines: list[BatchLine], endpoint: str) -> None:
    """Every line must use the batch's endpoint."""
    for line in lines:
        if line.url != endpoint:
            raise _bad(line.line_no, f"'url' is {line.url} but the batch's endpoint is {endpoint}")
