"""Request status, the cancel endpoint, client disconnects (streaming and not), and /metrics."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from shared.transport.queue_client import collect, submit
from shared.wire.messages import RequestMsg
from tests.gateway.conftest import MODEL_NAME

pytestmark = pytest.mark.multiproc
LONG = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 1500, "temperature": 0}
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def _sse_events(lines):
    """Parsed `data:` payloads of an SSE line iterator ("[DONE]" stays a string)."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def _wait_finished(cluster, request_id: str):
    result = collect(cluster.r, cluster.cfg, request_id, timeout_s=60)
    assert result.finished, result
    return result


def test_cancel_endpoint_ends_a_stream_and_status_follows(client, cluster) -> None:
    with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        request_id = r.headers["X-Request-Id"]
        events = _sse_events(r.iter_lines())
        first = next(events)
        assert first["id"] == request_id
        status = client.get(f"/v1/requests/{request_id}").json()
        assert status["status"] in ("queued", "running") and status["finish_reason"] is None
        cancel = client.post(f"/v1/requests/{request_id}/cancel")
        assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
        rest = list(events)
    assert rest[-1] == "[DONE]"
    assert rest[-2]["choices"][0]["finish_reason"] == "cancelled"
    assert _wait_finished(cluster, request_id).finish_reason == "cancelled"
    status = client.get(f"/v1/requests/{request_id}").json()
    assert status["status"] == "finished" and status["finish_reason"] == "cancelled"
    assert 0 < status["completion_tokens"] < 1500 and len(status["tokens"]) == status["completion_tokens"]
    again = client.post(f"/v1/requests/{request_id}/cancel").json()
    assert again["cancelled"] is False and again["status"] == "finished"


def test_streaming_client_disconnect_cancels_the_request(client, cluster) -> None:
    with client.stream("POST", "/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1500,
        "temperature": 0, "stream": True,
    }) as r:
        request_id = r.headers["X-Request-Id"]
        lines = r.iter_lines()
        got = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(2))]
        assert len(got) == 2
    # the response (and its connection) is closed here, mid-stream
    result = _wait_finished(cluster, request_id)
    assert result.finish_reason == "cancelled" and len(result.tokens) < 1500
    deadline = time.monotonic() + 10
    while client.get(f"/v1/requests/{request_id}").json()["status"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get(f"/v1/requests/{request_id}").json()["finish_reason"] == "cancelled"


def test_non_streaming_client_disconnect_cancels_the_request(gateway, cluster) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        cancelled_before = _cancelled(c.get("/metrics").text)
        with httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(60, read=2.0)) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/completions", json=LONG)  # gives up after 2 s and closes the connection
        deadline = time.monotonic() + 30
        while _cancelled(c.get("/metrics").text) == cancelled_before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _cancelled(c.get("/metrics").text) == cancelled_before + 1
    pending = [k for k in cluster.r.scan_iter(cluster.cfg.out("cmpl-*"))]
    finished = [collect(cluster.r, cluster.cfg, k.decode().rsplit(":", 1)[1], timeout_s=30) for k in pending]
    assert all(f.finished for f in finished)  # nothing left running in the pipeline


def _cancelled(metrics_text: str) -> int:
    match = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="cancelled"\} (\d+)$', metrics_text, re.M)
    return int(match.group(1)) if match else 0


def test_status_falls_back_to_the_out_stream(client, cluster) -> None:
    submit(cluster.r, cluster.cfg, RequestMsg("direct-1", [5, 17, 99, 3], 5))  # not through this gateway
    result = _wait_finished(cluster, "direct-1")
    status = client.get("/v1/requests/direct-1").json()
    assert status["status"] == "finished" and status["tokens"] == result.tokens
    assert status["finish_reason"] == result.finish_reason


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else -1


def _metrics(client) -> tuple[str, dict[str, float]]:
    text = client.get("/metrics").text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, line
        key = match.group(1) + (match.group(2) or "")
        values[key] = float(match.group(3))
    return text, values


def test_metrics_move_after_requests(client) -> None:
    _, before = _metrics(client)
    for stream in (False, True):
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3,
                                                 "temperature": 0, "stream": stream})
        assert r.status_code == 200
    text, after = _metrics(client)
    label = f'{{model_name="{MODEL_NAME}"}}'
    assert after[f"vllm:generation_tokens_total{label}"] >= before.get(f"vllm:generation_tokens_total{label}", 0) + 2
    assert after[f"vllm:prompt_tokens_total{label}"] > before.get(f"vllm:prompt_tokens_total{label}", 0)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        key = f"vllm:{hist}_count{label}"
        assert after[key] >= before.get(key, 0) + 2, hist
    assert f"vllm:inter_token_latency_seconds_count{label}" in after
    assert f"vllm:time_per_output_token_seconds_count{label}" in after
    assert sum(v for k, v in after.items() if k.startswith("vllm:request_success_total")) >= 2
    assert "# TYPE vllm:num_requests_waiting gauge" in text and "# TYPE vllm:num_requests_running gauge" in text


def test_speculation_and_pipeline_metrics_come_from_the_scheduler(client) -> None:
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5, 6, 7, 5, 6, 7, 5, 6], "max_tokens": 40,
                                             "temperature": 0})
    assert r.status_code == 200
    label = f'model_name="{MODEL_NAME}"'
    deadline = time.monotonic() + 10
    while True:  # the scheduler rewrites its snapshot every 0.5 s
        _, m = _metrics(client)
        if m.get(f"specpipe:pipeline_steps_total{{{label}}}", 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    drafts = m[f"vllm:spec_decode_num_draft_tokens_total{{{label}}}"]
    accepted = m[f"vllm:spec_decode_num_accepted_tokens_total{{{label}}}"]
    per_pos = [v for k, v in m.items() if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total")]
    assert 0 < accepted <= drafts and sum(per_pos) == accepted and len(per_pos) == 16
    assert m[f"vllm:spec_decode_num_drafts_total{{{label}}}"] > 0
    assert 0 < m[f"specpipe:tokens_per_step{{{label}}}"] <= 16
    busy = [m[f'specpipe:stage_busy_fraction{{{label},stage="{s}"}}'] for s in (0, 1)]
    assert all(0 < b <= 1 for b in busy)
    assert m[f'specpipe:computed_rows_total{{{label},fate="useful"}}'] > 0
    assert f"specpipe:pruned_nodes_total{{{label}}}" in m and f"specpipe:scheduler_queue_depth{{{label}}}" in m
