"""Pieces of batch jobs, one at a time: the JSONL input, request ids, the Redis store."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.batches.input import BatchLine, check_endpoint, parse_jsonl
from gateway.batches.runner import request_id
from gateway.batches.store import BatchStore
from gateway.errors import APIError
from shared.wire.messages import RequestMsg, decode
from tests.cluster import REDIS_URL

CHAT = "/v1/chat/completions"


def _line(custom_id: str = "a", url: str = CHAT, **body) -> str:
    body = body or {"messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _error(data: bytes) -> str:
    with pytest.raises(APIError) as info:
        parse_jsonl(data)
    assert info.value.status == 400
    return info.value.message


@pytest.mark.unit
def test_jsonl_lines_are_numbered_as_in_the_file() -> None:
    lines = parse_jsonl(f"{_line('a')}\n\n{_line('b', '/v1/completions', prompt='x')}\n".encode())
    assert [(x.index, x.line_no, x.custom_id, x.url) for x in lines] == [
        (0, 1, "a", CHAT), (1, 3, "b", "/v1/completions")]
    assert _error(f"{_line('a')}\n\n{_line('b', temperature=-1, messages=[])}".encode()).startswith("line 3: body.")


@pytest.mark.unit
@pytest.mark.parametrize("body,message", [
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "line 1: body.stream"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "line 1: body.n is not supported"),
    ({"messages": "hi"}, "line 1: body.messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "line 1: body.max_tokens"),
])
def test_jsonl_bodies_are_checked_like_the_http_endpoint(body, message) -> None:
    assert _error(_line("a", **body).encode()).startswith(message)


@pytest.mark.unit
def test_jsonl_file_level_errors() -> None:
    assert _error(b"\n \n") == "the file has no requests"
    assert "UTF-8" in _error(b"\xff\xfe")
    assert _error(b'{"custom_id": "", "method": "POST"}').startswith("line 1: 'custom_id'")
    with pytest.raises(APIError, match="line 2: 'url' is /v1/completions"):
        check_endpoint([BatchLine(0, 1, "a", CHAT, {}), BatchLine(1, 2, "b", "/v1/completions", {})], CHAT)


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
            assert await store.record_result("b1", "c", {"n": 1}, True)
            assert not await store.record_result("b1", "c", {"n": 2}, False)
            assert await store.results("b1") == {"c": {"n": 1}}
            assert await store.counts("b1") == {"completed": 1}
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
