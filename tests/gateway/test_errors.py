"""Every error status, in OpenAI's error shape, through plain HTTP against real gateway processes."""

from __future__ import annotations

import httpx
import pytest

from shared.transport.queue_client import collect
from tests.cluster import Cluster
from tests.gateway.conftest import MODEL_NAME, Gateway

pytestmark = pytest.mark.multiproc
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, "temperature": 0}


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "parallel_tool_calls": False}, "parallel_tool_calls"),
    ("/v1/chat/completions", {**CHAT, "echo": True}, "echo"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {**COMPLETION, "suffix": "end"}, "suffix"),
    ("/v1/completions", {**COMPLETION, "best_of": 3, "n": 2}, "best_of"),
    ("/v1/completions", {**COMPLETION, "logprobs": True}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {**COMPLETION, "min_p": 1.5}, "min_p"),
    ("/v1/completions", {**COMPLETION, "best_of": 2}, "best_of"),
    ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1}, "echo"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"five": 10}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"999999999": 10}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": 3}, "temperature"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
    ("/v1/completions", {k: v for k, v in COMPLETION.items() if k != "prompt"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", ""]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 5, "n": 16}, "prompt"),  # over MAX_CHOICES
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [[]]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [10**9]}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "speculation": {"policy": "magic"}}, "speculation.policy"),
    ("/v1/chat/completions", {**CHAT, "speculation": {"width": 0}}, "speculation.width"),
    ("/v1/chat/completions", {**CHAT, "speculation": {"depth": 3}}, "speculation.depth"),
])
def test_bad_parameters_are_400_naming_the_field(client, path, body, param) -> None:
    assert_error(client.post(path, json=body), 400, param=param)


def test_malformed_json_is_400(client) -> None:
    r = client.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert_error(client.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)


def test_unknown_model_route_and_request_are_404(client) -> None:
    assert_error(client.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404, "model",
                 "model_not_found")
    assert_error(client.get("/v1/models/gpt-9"), 404)
    assert_error(client.get("/v1/requests/cmpl-nope"), 404, code="request_not_found")
    assert_error(client.post("/v1/requests/cmpl-nope/cancel"), 404)
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/completions"), 405)
    assert client.put("/v1/files").headers["allow"] == "GET, POST"  # every method of the path, not the first one


def test_context_length_exceeded(client) -> None:
    assert_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5000}), 400, "max_tokens",
                 "context_length_exceeded")
    body = {**COMPLETION, "prompt": [5] * 2048}
    del body["max_tokens"]
    assert_error(client.post("/v1/completions", json=body), 400, code="context_length_exceeded")
    chat = {**CHAT, "max_completion_tokens": 2048}
    assert_error(client.post("/v1/chat/completions", json=chat), 400, code="context_length_exceeded")


def test_api_keys(keyed_gateway) -> None:
    with httpx.Client(base_url=keyed_gateway.url, timeout=120) as c:
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer key-three"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Basic key-one"}), 401)
        assert_error(c.get("/metrics"), 401)
        r = c.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"})
        assert_error(r, 401)  # authentication comes before the body is read
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        for key in ("key-one", "key-two"):
            auth = {"Authorization": f"Bearer {key}"}
            assert c.get("/v1/models", headers=auth).status_code == 200
            assert c.get("/metrics", headers=auth).status_code == 200
        r = c.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer key-two"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_not_ready_is_503(orphan_gateway, gateway) -> None:
    with httpx.Client(base_url=orphan_gateway.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        error = assert_error(c.get("/ready"), 503, code="not_ready")
        assert "scheduler" in error["message"]
        assert_error(c.post("/v1/completions", json=COMPLETION), 503, code="not_ready")
        assert_error(c.post("/v1/chat/completions", json={**CHAT, "stream": True}), 503, code="not_ready")
    r = httpx.get(gateway.url + "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_queue_full_is_429_with_retry_after(gw_tmp, tiny_dir) -> None:
    cluster = Cluster(gw_tmp, str(tiny_dir), stages=1, policy="pp", extra=("--max-queue", "0"))
    gateway = None
    try:
        gateway = Gateway(gw_tmp, tiny_dir, cluster.cfg.prefix, "--stages", "1", name="queue-full")
        with httpx.Client(base_url=gateway.url, timeout=60) as c:
            r = c.post("/v1/completions", json=COMPLETION)
            assert_error(r, 429, code="queue_full")
            assert int(r.headers["Retry-After"]) >= 1
            r = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert_error(r, 429, code="queue_full")  # refused before the stream starts
            assert "Retry-After" in r.headers
    finally:
        if gateway is not None:
            gateway.close()
        cluster.close()


def test_timeout_is_504_and_cancels(gw_tmp, tiny_dir, cluster) -> None:
    gateway = Gateway(gw_tmp, tiny_dir, cluster.cfg.prefix, "--request-timeout", "1.5", name="short-timeout")
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as c:
            r = c.post("/v1/completions", json={**COMPLETION, "prompt": [5, 6, 7], "max_tokens": 1500})
            assert_error(r, 504, code="timeout")
            text = c.get("/metrics").text
            assert f'specpipe:requests_ended_total{{model_name="{MODEL_NAME}",reason="timeout"}} 1.0' in text
            assert f'vllm:request_success_total{{engine="0",finished_reason="abort",model_name="{MODEL_NAME}"}} 1.0' \
                in text
            streamed = c.post("/v1/completions", json={**COMPLETION, "prompt": [5, 6, 7], "max_tokens": 1500,
                                                       "stream": True})
        for resp in (r, streamed):
            result = collect(cluster.r, cluster.cfg, resp.headers["X-Request-Id"], timeout_s=60)
            assert result.finished and result.finish_reason == "cancelled" and len(result.tokens) < 1500
        if streamed.status_code == 200:  # tokens came before the deadline: the error ends the stream
            events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and '"code": "timeout"' in events[-2]
        else:
            assert_error(streamed, 504, code="timeout")
    finally:
        gateway.close()
