"""Request status, the cancel endpoint, client disconnects (streaming and not), and /metrics (scraped and parsed
with prometheus-client's own parser)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.transport.queue_client import collect, submit
from shared.transport.redis_io import publish
from shared.wire.messages import CancelMsg, RequestMsg
from specpipe.cluster import ServiceLimits
from tests.gateway.conftest import MODEL_NAME

pytestmark = pytest.mark.multiproc
LONG = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 1500, "temperature": 0}
VLLM = {"model_name": MODEL_NAME, "engine": "0"}
OWN = {"model_name": MODEL_NAME}
FAMILIES = [  # (family name as the parser gives it, type): vLLM's names, then SpecPipe's own
    ("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
    ("vllm:prompt_tokens", "counter"), ("vllm:generation_tokens", "counter"), ("vllm:request_success", "counter"),
    ("vllm:time_to_first_token_seconds", "histogram"), ("vllm:inter_token_latency_seconds", "histogram"),
    ("vllm:time_per_output_token_seconds", "histogram"), ("vllm:e2e_request_latency_seconds", "histogram"),
    ("vllm:request_queue_time_seconds", "histogram"), ("vllm:request_prompt_tokens", "histogram"),
    ("vllm:request_generation_tokens", "histogram"), ("vllm:spec_decode_num_drafts", "counter"),
    ("vllm:spec_decode_num_draft_tokens", "counter"), ("vllm:spec_decode_num_accepted_tokens", "counter"),
    ("vllm:spec_decode_num_accepted_tokens_per_pos", "counter"), ("specpipe:gateway_inflight_requests", "gauge"),
    ("specpipe:requests_ended", "counter"), ("specpipe:gateway_added_latency_seconds", "histogram"),
    ("specpipe:pipeline_steps", "counter"), ("specpipe:tokens_per_step", "gauge"),
    ("specpipe:stage_busy_fraction", "gauge"), ("specpipe:scheduler_queue_depth", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"), ("specpipe:stage_kv_cache_usage_perc", "gauge"),  # the stages' snapshots
]


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
    assert rest[-1] == "[DONE]"  # no finish_reason outside OpenAI's set: the stream ends with an error event
    assert rest[-2]["error"]["code"] == "request_cancelled" and "choices" not in rest[-2]
    assert all(e["choices"][0]["finish_reason"] is None for e in [first, *rest[:-2]] if "choices" in e)
    assert _wait_finished(cluster, request_id).finish_reason == "cancelled"
    status = client.get(f"/v1/requests/{request_id}").json()
    assert status["status"] == "cancelled" and status["finish_reason"] is None
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
    while client.get(f"/v1/requests/{request_id}").json()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    status = client.get(f"/v1/requests/{request_id}").json()
    assert status["status"] == "cancelled" and status["finish_reason"] is None


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
    return int(_samples(metrics_text).get(("specpipe:requests_ended_total", _labels(OWN, reason="cancelled")), 0))


def test_status_falls_back_to_the_out_stream(client, cluster) -> None:
    submit(cluster.r, cluster.cfg, RequestMsg("direct-1", [5, 17, 99, 3], 5))  # not through this gateway
    result = _wait_finished(cluster, "direct-1")
    status = client.get("/v1/requests/direct-1").json()
    assert status["status"] == "finished" and status["tokens"] == result.tokens
    assert status["finish_reason"] == result.finish_reason
    cancelled = "direct-2"
    submit(cluster.r, cluster.cfg, RequestMsg(cancelled, [5, 17, 99, 3], 1500))
    deadline = time.monotonic() + 30
    while not cluster.r.xlen(cluster.cfg.out(cancelled)) and time.monotonic() < deadline:
        time.sleep(0.05)  # running: the scheduler has it
    publish(cluster.r, cluster.cfg.cancel, CancelMsg(cancelled))
    assert _wait_finished(cluster, cancelled).finish_reason == "cancelled"
    status = client.get(f"/v1/requests/{cancelled}").json()
    assert status["status"] == "cancelled" and status["finish_reason"] is None


def _labels(base: dict[str, str], **extra: str) -> frozenset:
    return frozenset({**base, **extra}.items())


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, parsed by prometheus-client's own parser (it refuses a malformed text)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(client) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """{family name: type} and the samples of one /metrics scrape."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(r.text))
    return {f.name: f.type for f in families}, _samples(r.text)


def _wait_for_snapshot(client, label: dict[str, str]) -> tuple[dict[str, str], dict]:
    deadline = time.monotonic() + 10
    while True:  # the scheduler rewrites its snapshot every 0.5 s
        types, m = _scrape(client)
        if m.get(("specpipe:pipeline_steps_total", _labels(label)), 0) > 0 or time.monotonic() > deadline:
            return types, m
        time.sleep(0.2)


def test_metrics_scrape_parses_and_moves_after_requests(client) -> None:
    _, before = _scrape(client)
    for stream in (False, True):
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3,
                                                 "temperature": 0, "stream": stream})
        assert r.status_code == 200
    types, after = _wait_for_snapshot(client, OWN)
    assert [(name, types.get(name)) for name, _ in FAMILIES] == FAMILIES

    def moved(name: str, labels: dict[str, str] = VLLM, **extra: str) -> float:
        key = (name, _labels(labels, **extra))
        return after[key] - before.get(key, 0)

    assert moved("vllm:generation_tokens_total") >= 2 and moved("vllm:prompt_tokens_total") > 0
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert moved(f"vllm:{hist}_count") >= 2, hist
    assert moved("vllm:request_success_total", finished_reason="length") >= 2
    assert moved("specpipe:requests_ended_total", OWN, reason="length") >= 2
    queue, ttft = (after[(f"vllm:{h}_sum", _labels(VLLM))] for h in ("request_queue_time_seconds",
                                                                      "time_to_first_token_seconds"))
    assert 0 <= queue < ttft  # the wait for the scheduler, not the time to the first token
    assert ("vllm:inter_token_latency_seconds_count", _labels(VLLM)) in after
    assert ("vllm:time_per_output_token_seconds_count", _labels(VLLM)) in after
    assert 0 <= after[("vllm:kv_cache_usage_perc", _labels(VLLM))] <= 1


def _kv_usage(client) -> tuple[float | None, list[float | None]]:
    """vllm:kv_cache_usage_perc and each stage's own series in one scrape (None: absent)."""
    _, m = _scrape(client)
    return (m.get(("vllm:kv_cache_usage_perc", _labels(VLLM))),
            [m.get(("specpipe:stage_kv_cache_usage_perc", _labels(OWN, stage=str(s)))) for s in (0, 1)])


def test_kv_cache_usage_is_the_fullest_stages_while_a_request_holds_kv(client, cluster) -> None:
    """The stages reserve a request's prompt and max_tokens (and its tree) when it is admitted: while it runs,
    the fullest stage holds at least that much of the --kv-slots budget."""
    rid, prompt, max_tokens = "kv-holder", [5, 6, 7], 1500
    reserved = (len(prompt) + max_tokens) / ServiceLimits.kv_slots  # at least, on every stage
    submit(cluster.r, cluster.cfg, RequestMsg(rid, prompt, max_tokens))
    try:
        deadline = time.monotonic() + 30
        while (usage := _kv_usage(client))[0] is None or usage[0] < reserved:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the stages rewrite their snapshots every 0.5 s
    finally:
        publish(cluster.r, cluster.cfg.cancel, CancelMsg(rid))
    fullest, per_stage = usage
    assert fullest is not None and reserved <= fullest <= 1
    assert None not in per_stage and fullest == max(per_stage)
    _wait_finished(cluster, rid)


def test_speculation_and_pipeline_metrics_come_from_the_scheduler(client) -> None:
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5, 6, 7, 5, 6, 7, 5, 6], "max_tokens": 40,
                                             "temperature": 0})
    assert r.status_code == 200
    _, m = _wait_for_snapshot(client, OWN)
    drafts = m[("vllm:spec_decode_num_draft_tokens_total", _labels(VLLM))]
    accepted = m[("vllm:spec_decode_num_accepted_tokens_total", _labels(VLLM))]
    per_pos = [v for (name, _), v in m.items() if name == "vllm:spec_decode_num_accepted_tokens_per_pos_total"]
    assert 0 < accepted <= drafts and sum(per_pos) == accepted and len(per_pos) == 16
    assert m[("vllm:spec_decode_num_drafts_total", _labels(VLLM))] > 0
    assert 0 < m[("specpipe:tokens_per_step", _labels(OWN))] <= 16
    busy = [m[("specpipe:stage_busy_fraction", _labels(OWN, stage=str(s)))] for s in (0, 1)]
    assert all(0 < b <= 1 for b in busy)
    assert m[("specpipe:computed_rows_total", _labels(OWN, fate="useful"))] > 0
    assert ("specpipe:pruned_nodes_total", _labels(OWN)) in m
    assert ("specpipe:scheduler_queue_depth", _labels(OWN)) in m
