"""Failures inside the gateway app, in process (httpx's ASGI transport) with the real Redis and a fake pipeline.

An unexpected exception is an OpenAI-shaped 500, never plain text; a pipeline that fails
mid-stream, or a gateway error mid-stream, ends the stream with an OpenAI error chunk and
[DONE]; the in-flight count is back to 0 after each. The fake pipeline is this test: it sets
the heartbeats, reads the RequestMsg and writes the out stream. Own key prefix, deleted after.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.config import GatewayConfig
from shared.transport.redis_io import pipeline_components
from shared.wire.messages import RequestMsg, TokensMsg, decode
from specpipe.cluster import delete_keys
from tests.cluster import REDIS_URL
from tests.gateway.conftest import MODEL_NAME

pytestmark = pytest.mark.unit
STREAM = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "stream": True}


@pytest.fixture
def app(tiny_dir):
    cfg = GatewayConfig(model=str(tiny_dir), redis_url=REDIS_URL, prefix=f"test-gwfail-{uuid.uuid4().hex[:8]}",
                        served_model_name=MODEL_NAME, stages=2)
    yield create_app(cfg)
    delete_keys(redis.Redis.from_url(REDIS_URL), cfg.prefix)


def _run(app, main):
    """asyncio.run(main()), closing the gateway's Redis side in the same loop."""
    async def run_and_close():
        try:
            return await main()
        finally:
            await app.state.gateway.queue.close()

    return asyncio.run(run_and_close())


def _client(app) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30)


def _events(text: str) -> list:
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def _assert_openai_error(error: dict, code: str) -> None:
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error


async def _fake_pipeline(app, *messages: tuple[list[int], str | None]) -> None:
    """Heartbeats for every component; then, for the first request, one TokensMsg per (tokens, finish_reason)."""
    rcfg = app.state.gateway.cfg.redis
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        reply = await r.xread({rcfg.requests: "0"}, count=1, block=10_000)
        request = decode(reply[0][1][0][1][b"m"])
        assert isinstance(request, RequestMsg)
        for tokens, reason in messages:
            await asyncio.sleep(0.05)
            msg = TokensMsg(request.request_id, tokens, reason is not None, reason,
                            "stage-1 is gone" if reason == "error" else None)
            await r.xadd(rcfg.out(request.request_id), {"m": msg.encode()})
    finally:
        await r.aclose()


@pytest.fixture
def heartbeats(app):
    r = redis.Redis.from_url(REDIS_URL)
    rcfg = app.state.gateway.cfg.redis
    for name in pipeline_components(2):
        r.set(rcfg.heartbeat(name), time.time(), px=60_000)


def test_an_unexpected_exception_is_an_openai_500(app) -> None:
    def boom(*_: object) -> list[int]:
        raise RuntimeError("a bug in tokenization")

    gw = app.state.gateway
    gw.codec.encode = gw.codec.encode_chat = boom

    async def main() -> None:
        async with _client(app) as c:
            for route, body in (("/v1/completions", {"model": MODEL_NAME, "prompt": "hi"}),
                                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
                r = await c.post(route, json=body)
                assert r.status_code == 500 and r.headers["content-type"] == "application/json"
                _assert_openai_error(r.json()["error"], "internal_error")
                assert "Traceback" not in r.text and "a bug" not in r.text

    _run(app, main)
    assert gw.admission.inflight == 0


def test_a_pipeline_failure_mid_stream_ends_with_an_openai_error_chunk(app, heartbeats) -> None:
    async def main() -> httpx.Response:
        async with _client(app) as c:
            r, _ = await asyncio.gather(c.post("/v1/completions", json=STREAM),
                                        _fake_pipeline(app, ([11, 12], None), ([], "error")))
            return r

    r = _run(app, main)
    assert r.status_code == 200
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    _assert_openai_error(events[-2]["error"], "pipeline_error")
    assert "stage-1 is gone" in events[-2]["error"]["message"]
    assert events[0]["choices"][0]["finish_reason"] is None  # the tokens came first
    assert app.state.gateway.admission.inflight == 0


def test_a_pipeline_failure_before_any_token_is_a_503(app, heartbeats) -> None:
    async def main() -> httpx.Response:
        async with _client(app) as c:
            r, _ = await asyncio.gather(c.post("/v1/completions", json=STREAM), _fake_pipeline(app, ([], "error")))
            return r

    r = _run(app, main)
    assert r.status_code == 503
    _assert_openai_error(r.json()["error"], "pipeline_error")


def test_a_gateway_error_mid_stream_ends_with_an_openai_error_chunk(app, heartbeats) -> None:
    gw = app.state.gateway
    decode_text, calls = gw.codec.decode, []

    def failing_decode(ids):
        calls.append(ids)
        if len(calls) > 1:
            raise RuntimeError("a bug in detokenization")
        return decode_text(ids)

    gw.codec.decode = failing_decode

    async def main() -> httpx.Response:
        async with _client(app) as c:
            r, _ = await asyncio.gather(c.post("/v1/completions", json=STREAM),
                                        _fake_pipeline(app, ([11, 12], None), ([13], None), ([14], "length")))
            return r

    r = _run(app, main)
    assert r.status_code == 200
    events = _events(r.text)
    assert events[-1] == "[DONE]" and "a bug" not in r.text
    _assert_openai_error(events[-2]["error"], "internal_error")
    assert gw.admission.inflight == 0
