"""Small pure pieces: no torch in the gateway, metrics format, API-key check, error shapes, prompts, the OpenAPI
patch, the added-latency histogram."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from gateway.auth import key_matches, protected
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.latency import NAME, AddedLatency, InstrumentedMetrics
from gateway.metrics import Metrics
from gateway.openapi import patch
from gateway.prompts import generation_spec
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from tests.cluster import ROOT

pytestmark = pytest.mark.unit
LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+(Inf)?$')


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


def test_metrics_text_format() -> None:
    m = Metrics('m"x', lambda: 2, lambda: 1)
    m.ttft.observe(0.03)
    m.observe_tokens(0.2, 4)
    m.e2e.observe(1.2)
    m.finished("stop")
    m.prompt_tokens, m.generation_tokens = 7, 4
    text = m.render()
    for line in text.splitlines():
        assert line.startswith("#") or LINE.match(line), line
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="m\\"x",le="0.04"} 1' in text
    assert 'vllm:inter_token_latency_seconds_count{model_name="m\\"x"} 4' in text
    assert 'vllm:time_per_output_token_seconds_count{model_name="m\\"x"} 4' in text
    assert 'vllm:request_success_total{model_name="m\\"x",finished_reason="stop"} 1' in text
    assert 'vllm:num_requests_running{model_name="m\\"x"} 2' in text


def test_key_matching_and_protected_paths() -> None:
    keys = ("alpha", "beta")
    assert key_matches("beta", keys) and key_matches("alpha", keys)
    assert not key_matches("gamma", keys) and not key_matches("", keys) and not key_matches("beta", ())
    assert protected("/v1/completions") and protected("/metrics") and protected("/v1")
    assert not protected("/health") and not protected("/ready") and not protected("/v1x")


def test_unsupported_fields_are_named() -> None:
    cases = {"n": 2, "best_of": 3, "logprobs": 1, "top_logprobs": 2, "tools": [{"type": "function"}],
             "echo": True, "suffix": "x", "logit_bias": {"5": 1}, "functions": [{}], "presence_penalty": 0.5}
    for name, value in cases.items():
        assert CompletionRequest(prompt="x", **{name: value}).unsupported() == name
    assert CompletionRequest(prompt="x", n=1, logit_bias={}, echo=False, tools=[]).unsupported() is None
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=False).unsupported() is None


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
    metrics = InstrumentedMetrics(Metrics("m", lambda: 0, lambda: 0))
    metrics.added.observe("submit", 0.0012)
    metrics.added.observe("deliver", -0.0001)  # clock rounding: clamped to 0
    text = metrics.render()
    assert text.count(f"# TYPE {NAME} histogram") == 1 and "vllm:e2e_request_latency_seconds" in text
    assert f'{NAME}_count{{model_name="m",component="submit"}} 1' in text
    assert f'{NAME}_bucket{{model_name="m",component="deliver",le="0.0005"}} 1' in text
    assert f'{NAME}_count{{model_name="m",component="round_trip"}} 0' in text
    assert AddedLatency().render({})[0].startswith(f"# HELP {NAME}")
