"""Batch input files: the JSONL format, read line by line; a bad line fails alone, the others run.

Each non-blank line is one request:
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
A line whose envelope is unusable (not UTF-8 or not JSON, not an object, no custom_id or one an earlier line
has, another method, a url other than the batch's endpoint, a body that is not an object) does not run: it
is a failed request of the batch, in its error file with `response: null` and `error: {code:
"invalid_batch_line", message}` (the message names the line: 1-based, counting blank lines). The body itself
is checked when its line runs, by the same models as the HTTP endpoint (`check_body`; `stream` is not allowed):
a bad body is that line's 400 response, as in OpenAI's Batch API. Only the file as a whole is refused at
upload: larger than MAX_FILE_BYTES, or more than MAX_LINES requests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gateway.errors import APIError, bad_request, validation_message
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

ENDPOINTS: dict[str, type[SamplingRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINES = 50_000
MAX_CUSTOM_ID = 512
INVALID_LINE = "invalid_batch_line"  # the error code of a line that cannot run


@dataclass(frozen=True)
class BatchLine:
    index: int  # position among the requests (0-based, blank lines skipped)
    line_no: int  # physical line in the file (1-based), for messages
    custom_id: str | None  # None only on a line that cannot run and has no usable one
    url: str | None
    body: dict[str, Any]
    error: str | None = None  # why the line cannot run ("line N: ..."); None for a line that runs


def _envelope_error(obj: Any, endpoint: str | None) -> str | None:
    """What makes a parsed line unusable, before its body is looked at; None if nothing."""
    if not isinstance(obj, dict):
        return "each line must be a JSON object"
    custom_id, url = obj.get("custom_id"), obj.get("url")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return f"'custom_id' must be a non-empty string of at most {MAX_CUSTOM_ID} characters"
    if obj.get("method") != "POST":
        return "'method' must be \"POST\""
    if url not in ENDPOINTS:
        return f"'url' must be one of {', '.join(ENDPOINTS)}"
    if endpoint is not None and url != endpoint:
        return f"'url' is {url} but the batch's endpoint is {endpoint}"
    if not isinstance(obj.get("body"), dict):
        return "'body' must be a JSON object"
    return None


def parse_line(raw: bytes, line_no: int, index: int, endpoint: str | None = None) -> BatchLine:
    """One JSONL line -> BatchLine; a line that cannot run carries its error (`endpoint`: the batch's, if known)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return BatchLine(index, line_no, None, None, {}, f"line {line_no}: not UTF-8 (byte {exc.start})")
    except json.JSONDecodeError as exc:
        return BatchLine(index, line_no, None, None, {}, f"line {line_no}: not valid JSON ({exc.msg})")
    problem = _envelope_error(obj, endpoint)
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    if problem is not None:
        usable = isinstance(custom_id, str) and 0 < len(custom_id) <= MAX_CUSTOM_ID
        return BatchLine(index, line_no, custom_id if usable else None, None, {}, f"line {line_no}: {problem}")
    return BatchLine(index, line_no, custom_id, obj["url"], obj["body"])


def check_body(url: str, body: dict[str, Any]) -> SamplingRequest:
    """The request body as the HTTP endpoint parses it (the same 400s), and no streaming in a batch."""
    try:
        req = ENDPOINTS[url].model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise bad_request(message, param, "invalid_value") from None
    if req.stream:
        raise bad_request("streaming is not supported in a batch", "stream", "invalid_value")
    return req


def parse_jsonl(data: bytes, endpoint: str | None = None) -> list[BatchLine]:
    """Every request line of a batch input file, the unusable ones with their error; 400 only for the file as a
    whole (too large, too many requests)."""
    if len(data) > MAX_FILE_BYTES:
        raise APIError(400, f"the file is larger than {MAX_FILE_BYTES} bytes", param="file", code="file_too_large")
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        line = parse_line(raw, line_no, len(lines), endpoint)
        if line.error is None and line.custom_id in seen:
            line = dataclasses.replace(line, error=f"line {line_no}: duplicate custom_id '{line.custom_id}' "
                                                   f"(first on line {seen[line.custom_id]})")
        elif line.error is None:
            seen[line.custom_id] = line_no
        lines.append(line)
        if len(lines) > MAX_LINES:
            raise APIError(400, f"line {line_no}: a batch holds at most {MAX_LINES} requests", param="file",
                           code="invalid_file")
    return lines
