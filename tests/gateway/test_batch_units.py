"""Pieces of batch jobs, the OpenAPI patch and the added-latency histogram, one at a time."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.batch_input import BatchLine, check_endpoint, parse_jsonl
from gateway.batch_runner import request_id
from gateway.batch_store import BatchStore
from gateway.errors import APIError
from gateway.latency import NAME, AddedLatency, InstrumentedMetrics
from gateway.metrics import Metrics
from gateway.openapi import patch
from shared.messages import RequestMsg, decode
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


@pytest.mark.unit
def test_openapi_patch_standardizes_bounds_and_drops_422() -> None:
    doc = {"paths": {"/v1/completions": {"post": {
        "requestBody": {"content": {"application/json": {"schema": {}}}},
        "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {}}}},
                      "422": {"description": "x"}}}}},
        "components": {"schemas": {"R": {"properties": {"t": {"anyOf": [{"type": "number"}], "ge": 0, "le": 2}}}}}}
    patch(doc)
    responses = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in responses and {"400", "401", "404", "429", "503", "504"} <= set(responses)
    assert doc["components"]["schemas"]["R"]["properties"]["t"] == {"anyOf": [{"type": "number"}], "minimum": 0,
                                                                     "maximum": 2}
    assert "ErrorResponse" in doc["components"]["schemas"] and "ErrorDetail" in doc["components"]["schemas"]
    assert responses["429"]["headers"]["Retry-After"]


@pytest.mark.unit
def test_added_latency_is_one_prometheus_family() -> None:
    metrics = InstrumentedMetrics(Metrics("m", lambda: 0, lambda: 0))
    metrics.added.observe("submit", 0.0012)
    metrics.added.observe("deliver", -0.0001)  # clock rounding: clamped to 0
    text = metrics.render()
    assert text.count(f"# TYPE {NAME} histogram") == 1 and "vllm:e2e_request_latency_seconds" in text
    assert f'{NAME}_count{{model_name="m",component="submit"}} 1' in text
    assert f'{NAME}_bucket{{model_name="m",component="deliver",le="0.0005"}} 1' in text
    assert f'{NAME}_count{{model_name="m",component="round_trip"}} 0' in text
    assert AddedLatency().render({})[0].startswith(f"# HELP {NAME}")


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
