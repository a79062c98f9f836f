"""Small pure pieces: no torch in the gateway, metrics format, API-key check, error shapes, prompts, the OpenAPI
patch, the added-latency histogram, finish reasons, 405's Allow header."""

from __future__ import annotations

import functools

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from gateway.app import create_app
from gateway.auth import key_matches, protected
from gateway.config import GatewayConfig
from gateway.engine import Update, outcome_error
from gateway.errors import APIError
from gateway.latency import NAME, InstrumentedMetrics
from gateway.metrics import Metrics, token_buckets
from gateway.openapi import patch
from gateway.prompts import generation_spec
from gateway.records import public_status
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from shared.wire.messages import SchedulerStatsMsg, StageStatsMsg
from tests.cluster import ROOT

pytestmark = pytest.mark.unit
VLLM = {"model_name": 'm"x', "engine": "0"}


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, parsed by prometheus-client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def test_gateway_never_imports_torch(tiny_dir) -> None:
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from gateway.config import GatewayConfig\n"
        f"create_app(GatewayConfig(model={str(tiny_dir)!r}))\n"
        "import gateway.__main__\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_metrics_exposition_parses_with_vllms_names_and_labels() -> None:
    m = Metrics('m"x', 2048, lambda: 2, lambda: 1)
    m.ttft.observe(0.03)
    m.observe_tokens(0.2, 4)
    m.e2e.observe(1.2)
    m.prompt_tokens.inc(7)
    m.generation_tokens.inc(4)
    for reason in ("stop", "cancelled", "timeout", "queue_full"):
        m.finished(reason, 7, 4)
    body, content_type = m.exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    got = _samples(body.decode())
    assert got[_key("vllm:time_to_first_token_seconds_bucket", **VLLM, le="0.04")] == 1
    assert got[_key("vllm:inter_token_latency_seconds_count", **VLLM)] == 4
    assert got[_key("vllm:time_per_output_token_seconds_count", **VLLM)] == 4
    assert got[_key("vllm:num_requests_running", **VLLM)] == 2
    assert got[_key("vllm:prompt_tokens_total", **VLLM)] == 7
    assert got[_key("vllm:request_success_total", **VLLM, finished_reason="stop")] == 1
    assert got[_key("vllm:request_success_total", **VLLM, finished_reason="abort")] == 2  # cancelled, timeout
    assert got[_key("vllm:request_prompt_tokens_count", **VLLM)] == 3  # queue_full never ran
    assert got[_key("vllm:request_generation_tokens_bucket", **VLLM, le="5.0")] == 3
    assert got[_key("specpipe:requests_ended_total", model_name='m"x', reason="queue_full")] == 1
    assert m.ended() == {"stop": 1, "cancelled": 1, "timeout": 1, "queue_full": 1}
    assert not any(name.startswith("vllm:spec_decode") for name, _ in got)  # no snapshot, no scheduler series


def test_scheduler_series_come_from_the_snapshot_given() -> None:
    stats = SchedulerStatsMsg(time=0.0, stages=2, steps=10, num_waiting=3, waiting=[], num_running=1, running=[],
                              tokens=25, drafts=9, draft_tokens=40, accepted=15, accepted_per_depth=[10, 5],
                              pruned=7, stage_busy=[1.0, 0.5], useful_rows=30, wasted_rows=12, speculating=True,
                              mode_rates={"plain@4": 10.0, "spec@4": 12.5})
    m = Metrics("m", 2048, lambda: 0, lambda: 0)
    got = _samples(m.exposition(stats)[0].decode())
    vllm = {"model_name": "m", "engine": "0"}
    assert got[_key("vllm:spec_decode_num_drafts_total", **vllm)] == 9
    assert got[_key("vllm:spec_decode_num_accepted_tokens_per_pos_total", **vllm, position="1")] == 5
    assert got[_key("specpipe:tokens_per_step", model_name="m")] == 2.5
    assert got[_key("specpipe:stage_busy_fraction", model_name="m", stage="1")] == 0.5
    assert got[_key("specpipe:computed_rows_total", model_name="m", fate="wasted")] == 12
    assert got[_key("specpipe:scheduler_queue_depth", model_name="m")] == 3
    assert got[_key("specpipe:speculating", model_name="m")] == 1
    assert got[_key("specpipe:mode_tokens_per_second", model_name="m", mode="spec", load="4")] == 12.5
    assert got[_key("specpipe:mode_tokens_per_second", model_name="m", mode="plain", load="4")] == 10.0
    assert not any(n.startswith("vllm:spec_decode") for n, _ in _samples(m.exposition()[0].decode()))


def _stage(stage: int, usage: float, kv_slots: int = 1000) -> StageStatsMsg:
    return StageStatsMsg(time=0.0, stage=stage, requests=1, kv_reserved=int(usage * kv_slots), kv_filled=1,
                         kv_slots=kv_slots, kv_usage=usage)


# label: (stage snapshots, vllm:kv_cache_usage_perc or None when absent, the per-stage series)
KV_SERIES = {
    "fullest stage": ([_stage(0, 0.25), _stage(1, 0.5)], 0.5, {"0": 0.25, "1": 0.5}),
    "budget unknown: left out": ([_stage(0, 0.0, kv_slots=0), _stage(1, 0.125)], 0.125, {"1": 0.125}),
    "no snapshot": ([], None, {}),
}


@pytest.mark.parametrize("stages,fullest,per_stage", list(KV_SERIES.values()), ids=list(KV_SERIES))
def test_kv_cache_usage_comes_from_the_stage_snapshots(stages, fullest, per_stage) -> None:
    m = Metrics("m", 2048, lambda: 0, lambda: 0)
    text = m.exposition(stages=stages)[0].decode()
    got = _samples(text)
    assert got.get(_key("vllm:kv_cache_usage_perc", model_name="m", engine="0")) == fullest
    assert {dict(labels)["stage"]: v for (name, labels), v in got.items()
            if name == "specpipe:stage_kv_cache_usage_perc"} == per_stage
    assert ("# TYPE vllm:kv_cache_usage_perc gauge" in text) == (fullest is not None)
    assert not any(n.startswith("vllm:kv_cache") for n, _ in _samples(m.exposition()[0].decode()))


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics("m", 100, lambda: 0, lambda: 0), InstrumentedMetrics(Metrics("m", 100, lambda: 0, lambda: 0))
    a.generation_tokens.inc(5)
    assert a.total("vllm:generation_tokens_total") == 5 and b.total("vllm:generation_tokens_total") == 0
    assert token_buckets(100) == [1, 2, 5, 10, 20, 50, 100] and token_buckets(2048)[-1] == 2000
    body, content_type = a.exposition(accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


@pytest.mark.parametrize("status,reason,shown", [
    ("finished", "stop", ("finished", "stop")),
    ("finished", "length", ("finished", "length")),
    ("finished", "cancelled", ("cancelled", None)),
    ("finished", "timeout", ("failed", None)),
    ("finished", "error", ("failed", None)),
    ("finished", "queue_full", ("failed", None)),
    ("running", None, ("running", None)),
], ids=["stop", "length", "cancelled", "timeout", "error", "queue-full", "running"])
def test_finish_reasons_shown_are_openais_only(status, reason, shown) -> None:
    assert public_status(status, reason) == shown


def test_a_cancelled_request_is_an_error_not_a_finish_reason() -> None:
    error = outcome_error(Update("", 0, True, "cancelled"), GatewayConfig(model="m"), "cmpl-1")
    assert error is not None and error.status == 499 and error.code == "request_cancelled"
    assert outcome_error(Update("", 0, True, "stop"), GatewayConfig(model="m"), "cmpl-1") is None


def test_key_matching_and_protected_paths() -> None:
    keys = ("alpha", "beta")
    assert key_matches("beta", keys) and key_matches("alpha", keys)
    assert not key_matches("gamma", keys) and not key_matches("", keys) and not key_matches("beta", ())
    assert protected("/v1/completions") and protected("/metrics") and protected("/v1")
    assert not protected("/health") and not protected("/ready") and not protected("/v1x")


UNSUPPORTED = {
    "best_of": {"best_of": 3}, "tools": {"tools": [{"type": "function"}]}, "functions": {"functions": [{}]},
    "suffix": {"suffix": "x"}, "tool_choice": {"tool_choice": "auto"}, "parallel_tool_calls": {"parallel_tool_calls": False},
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_fields_are_named(name: str) -> None:
    assert CompletionRequest(prompt="x", **UNSUPPORTED[name]).unsupported() == name


SUPPORTED = {
    "n": {"n": 2, "best_of": 2}, "logprobs": {"logprobs": 3}, "echo": {"echo": True},
    "logit_bias": {"logit_bias": {"5": 1}}, "penalties": {"presence_penalty": 0.5, "frequency_penalty": -1},
    "no tools": {"tools": [], "tool_choice": "none", "parallel_tool_calls": True},
}


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_supported_fields_pass(name: str) -> None:
    assert CompletionRequest(prompt="x", **SUPPORTED[name]).unsupported() is None


def test_chat_logprobs_and_echo() -> None:
    chat = functools.partial(ChatCompletionRequest, messages=[{"role": "user", "content": "x"}])
    assert chat(logprobs=False).unsupported() is None and chat(logprobs=True).top_logprobs_count() == 0
    assert chat(logprobs=True, top_logprobs=4).top_logprobs_count() == 4
    assert chat(top_logprobs=2).unsupported() == "top_logprobs" and chat(echo=True).unsupported() == "echo"
    assert CompletionRequest(prompt="x", echo=True, logprobs=0).unsupported() == "echo"


def test_choices_are_seeded_seed_plus_index_and_options_reach_the_spec() -> None:
    cfg = GatewayConfig(model="m", max_prompt_tokens=100, default_max_tokens=30)
    req = CompletionRequest(prompt="x", seed=7, temperature=0.5, n=3, logit_bias={"5": -2}, repetition_penalty=1.2,
                            stop_token_ids=[9], ignore_eos=True, response_format={"type": "json_object"})
    specs = [generation_spec(req, [1, 2], cfg, "prompt", i, vocab_size=100) for i in range(3)]
    assert [s.seed for s in specs] == [7, 8, 9]
    assert specs[0].logit_bias == ((5, -2.0),) and specs[0].repetition_penalty == 1.2 and specs[0].grammar
    assert specs[0].stop_token_ids == (9,) and specs[0].ignore_eos
    assert specs[0].sampling().params().logit_bias == ((5, -2.0),)


def test_context_length_and_defaults() -> None:
    cfg = GatewayConfig(model="m", max_prompt_tokens=100, default_max_tokens=30)
    spec = generation_spec(CompletionRequest(prompt="x"), [1] * 90, cfg, "prompt")
    assert spec.max_tokens == 10 and spec.temperature == 1.0 and spec.top_k == 0
    assert generation_spec(CompletionRequest(prompt="x", temperature=0), [1] * 5, cfg, "prompt").max_tokens == 30
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=5, max_completion_tokens=9)
    assert generation_spec(chat, [1] * 5, cfg, "messages").max_tokens == 9
    for prompt_len, max_tokens in ((90, 11), (100, None)):
        with pytest.raises(APIError) as err:
            generation_spec(CompletionRequest(prompt="x", max_tokens=max_tokens), [1] * prompt_len, cfg, "prompt")
        assert err.value.status == 400 and err.value.code == "context_length_exceeded"


def test_unknown_model_is_a_clean_exit() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "--model", "no-such-model", "--port", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown model")
    assert "Traceback" not in result.stderr


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


def test_added_latency_is_one_prometheus_family() -> None:
    metrics = InstrumentedMetrics(Metrics("m", 100, lambda: 0, lambda: 0))
    metrics.added.observe("submit", 0.0012)
    metrics.added.observe("deliver", -0.0001)  # clock rounding: clamped to 0
    text = metrics.exposition()[0].decode()
    assert text.count(f"# TYPE {NAME} histogram") == 1 and "vllm:e2e_request_latency_seconds" in text
    got = _samples(text)
    assert got[_key(f"{NAME}_count", model_name="m", component="submit")] == 1
    assert got[_key(f"{NAME}_bucket", model_name="m", component="deliver", le="0.0005")] == 1
    assert got[_key(f"{NAME}_count", model_name="m", component="round_trip")] == 0


@pytest.mark.parametrize("field,value", [
    ("prompt", ""), ("prompt", []), ("prompt", [[]]), ("prompt", [""]),
], ids=["empty-string", "empty-ids", "empty-nested-ids", "empty-string-item"])
def test_empty_prompts_are_outside_the_schema(field, value) -> None:
    with pytest.raises(ValidationError, match="prompt is empty"):
        CompletionRequest(**{field: value})
    prompt = CompletionRequest.model_json_schema()["properties"]["prompt"]["anyOf"]
    assert [variant.get("minItems", variant.get("minLength")) for variant in prompt] == [1, 1, 1, 1]


@pytest.mark.parametrize("message", [
    {"role": "", "content": "x"}, {"role": "tool", "content": "x"},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    {"role": "user", "content": [{"type": "text"}]},
], ids=["empty-role", "tool-role", "image-part", "text-part-without-text"])
def test_chat_messages_the_server_refuses_are_outside_the_schema(message) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[message])
    role = ChatCompletionRequest.model_json_schema()["$defs"]["ChatMessage"]["properties"]["role"]
    assert role["enum"] == ["system", "developer", "user", "assistant"]


def test_405_allow_lists_every_method_of_the_path(tiny_dir) -> None:
    with TestClient(create_app(GatewayConfig(model=str(tiny_dir)))) as c:
        for method, path, allow in (("PUT", "/v1/files", "GET, POST"), ("PATCH", "/v1/files/f-1", "GET, DELETE"),
                                    ("DELETE", "/v1/batches", "GET, POST"), ("GET", "/v1/completions", "POST")):
            r = c.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)
            assert r.json()["error"]["type"] == "invalid_request_error"
