"""Pieces of batch jobs, one at a time: the JSONL input, request ids, the Redis store."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.batches.input import MAX_FILE_BYTES, BatchLine, check_body, parse_jsonl
from gateway.batches.routes import batch_usage
from gateway.batches.runner import invalid_line_result, request_id, result_line, usage_of
from gateway.batches.store import BatchStore
from gateway.errors import APIError
from shared.wire.messages import RequestMsg, decode
from tests.cluster import REDIS_URL

CHAT = "/v1/chat/completions"


def _line(custom_id: str = "a", url: str = CHAT, **body) -> str:
    body = body or {"messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


@pytest.mark.unit
def test_jsonl_lines_are_numbered_as_in_the_file() -> None:
    lines = parse_jsonl(f"{_line('a')}\n\n{_line('b', '/v1/completions', prompt='x')}\n".encode())
    assert [(x.index, x.line_no, x.custom_id, x.url, x.error) for x in lines] == [
        (0, 1, "a", CHAT, None), (1, 3, "b", "/v1/completions", None)]


@pytest.mark.unit
@pytest.mark.parametrize("line,custom_id,message", [
    (b"not json", None, "line 2: not valid JSON"),
    (b"\xff\xfe", None, "line 2: not UTF-8"),
    (b"[1, 2]", None, "line 2: each line must be a JSON object"),
    (b'{"custom_id": "", "method": "POST"}', None, "line 2: 'custom_id'"),
    (_line("g", method="x").replace('"POST"', '"GET"').encode(), "g", "line 2: 'method'"),
    (_line("u", "/v1/embeddings").encode(), "u", "line 2: 'url' must be one of"),
    (_line("e", "/v1/completions", prompt="x").encode(), "e", "line 2: 'url' is /v1/completions but"),
    (b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": 5}', "b", "line 2: 'body'"),
    (_line("ok").encode(), "ok", "line 2: duplicate custom_id 'ok' (first on line 1)"),
], ids=["json", "utf8", "not-object", "custom-id", "method", "url", "endpoint", "body", "duplicate"])
def test_a_bad_line_fails_alone(line, custom_id, message) -> None:
    lines = parse_jsonl(_line("ok").encode() + b"\n" + line + b"\n" + _line("last").encode(), CHAT)
    assert [x.error for x in lines].count(None) == 2 and lines[2].custom_id == "last"
    bad = lines[1]
    assert bad.error.startswith(message) and bad.custom_id == custom_id


@pytest.mark.unit
@pytest.mark.parametrize("body,param,message", [
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "stream", "streaming is not supported"),
    ({"messages": "hi"}, "messages", "messages: "),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens", "max_tokens: "),
    ({"messages": [{"role": "", "content": "x"}]}, "messages.0.role", "messages.0.role: "),
], ids=["stream", "messages", "max-tokens", "role"])
def test_bodies_are_checked_like_the_http_endpoint_when_they_run(body, param, message) -> None:
    assert parse_jsonl(_line("a", **body).encode())[0].error is None  # the upload takes it: the line will fail
    with pytest.raises(APIError) as info:
        check_body(CHAT, body)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "invalid_value")
    assert info.value.message.startswith(message)


@pytest.mark.unit
def test_jsonl_file_level_limits() -> None:
    assert parse_jsonl(b"\n \n") == [] and parse_jsonl(b"") == []  # an empty file is a file; a batch refuses it
    with pytest.raises(APIError) as info:
        parse_jsonl(b"x" * (MAX_FILE_BYTES + 1))
    assert info.value.code == "file_too_large"


@pytest.mark.unit
def test_result_lines_carry_errors_as_openai_does() -> None:
    line = BatchLine(3, 4, "c", CHAT, {})
    ok = result_line("batch_x", line, "rid", 200, {"usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert ok["error"] is None and ok["response"]["status_code"] == 200
    failed = result_line("batch_x", line, "rid", 404, {"error": {"message": "no", "type": "t", "code": "nope"}})
    assert failed["error"] == {"code": "nope", "message": "no"} and failed["response"]["status_code"] == 404
    bad = invalid_line_result("batch_x", BatchLine(3, 4, None, None, {}, "line 4: not valid JSON"))
    assert bad == {"id": "batch_x-req-3", "custom_id": None, "response": None,
                   "error": {"code": "invalid_batch_line", "message": "line 4: not valid JSON"}}
    assert usage_of(ok["response"]["body"]) == (5, 2) and usage_of(failed["response"]["body"]) == (0, 0)
    assert batch_usage({"input_tokens": 5, "output_tokens": 2})["total_tokens"] == 7
    assert batch_usage({}) == {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}


@pytest.mark.unit
def test_request_ids_are_deterministic_per_line_and_attempt() -> None:
    line = BatchLine(7, 9, "x", CHAT, {})
    assert request_id(line, "batch_ab", 0) == "chatcmpl-batch_ab-7" == request_id(line, "batch_ab", 0)
    assert request_id(line, "batch_ab", 2) == "chatcmpl-batch_ab-7-2"
    assert request_id(BatchLine(7, 9, "x", "/v1/completions", {}), "batch_ab", 0) == "cmpl-batch_ab-7"


@pytest.mark.multiproc
def test_store_records_and_publishes_each_id_once() -> None:
    async def go() -> None:
        r, prefix = aioredis.Redis.from_url(REDIS_URL), f"test-{uuid.uuid4().hex[:8]}"
        store = BatchStore(r, prefix)
        try:
            await store.create_batch({"id": "b1", "created_at": 1})
            assert await store.record_result("b1", "c", {"n": 1}, True, (5, 3))
            assert not await store.record_result("b1", "c", {"n": 2}, False, (9, 9))
            assert await store.record_result("b1", "d", {"n": 3}, False)
            assert await store.results("b1") == {"c": {"n": 1}, "d": {"n": 3}}
            assert await store.counts("b1") == {"completed": 1, "failed": 1, "input_tokens": 5, "output_tokens": 3}
            msg, stream = RequestMsg("rid-0", [1, 2], 4), f"{prefix}:requests"
            assert await store.submit_once("b1", stream, msg) and not await store.submit_once("b1", stream, msg)
            entries = await r.xrange(stream)
            assert [decode(f[b"m"], RequestMsg).request_id for _, f in entries] == ["rid-0"]
            assert await store.transition("b1", "in_progress", "validating") == (True, "in_progress")
            assert await store.transition("b1", "in_progress", "validating") == (False, "in_progress")
            assert await store.acquire("b1", "t1", 5) and not await store.acquire("b1", "t2", 5)
            assert not await store.refresh("b1", "t2", 5) and await store.refresh("b1", "t1", 5)
            await store.release("b1", "t2")
            assert await store.lease_ttl_ms("b1") > 0
            await store.release("b1", "t1")
            assert await store.lease_ttl_ms("b1") == -2
        finally:
            keys = [k async for k in r.scan_iter(f"{prefix}:*")]
            if keys:
                await r.delete(*keys)
            await r.aclose()

    asyncio.run(go())
