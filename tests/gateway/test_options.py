"""Every sampling option through the real services (gateway, scheduler, 2 stages, a draft; specpipe and tree
per request) equals in-process plain decoding (pp, one stage) with the same option: streamed, not streamed,
n > 1, batched prompts, echo, logprobs; a request a stage cannot take fails alone."""

from __future__ import annotations

import functools
import json
import time
import uuid

import httpx
import pytest

from gateway.codec import TextCodec
from shared.transport.queue_client import collect
from shared.types.config import SamplingParams
from shared.types.structured import grammar_of
from shared.wire.messages import OccupancyMsg, RequestMsg, SamplingFields, decode
from tests.gateway.conftest import MODEL_NAME
from tests.helpers import pipeline

pytestmark = pytest.mark.multiproc
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
# label: (request fields, SamplingParams fields of the reference)
OPTIONS = {
    "min_p": ({"min_p": 0.2}, {"min_p": 0.2}),
    "logit_bias": ({"logit_bias": {"5": 100, "17": -100}}, {"logit_bias": ((5, 100.0), (17, -100.0))}),
    "penalties": ({"presence_penalty": -1.5, "frequency_penalty": 0.5, "repetition_penalty": 0.7},
                  {"presence_penalty": -1.5, "frequency_penalty": 0.5, "repetition_penalty": 0.7}),
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
                    {"grammar": grammar_of({"type": "json_schema", "json_schema": {"schema": SCHEMA}})}),
}
BASES = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.3, "seed": 5}}
MAX_TOKENS = 10


@functools.lru_cache(maxsize=None)
def _codec(tiny_dir) -> TextCodec:
    return TextCodec(tiny_dir)


def reference(tiny_dir, ids: tuple[int, ...], params: SamplingParams, stops: tuple[int, ...] | None = None):
    """In-process plain decoding: (text, tokens, logprobs) with the model's eos as stop ids (or `stops`)."""
    from scheduler.scheduler import Request

    codec = _codec(tiny_dir)
    req = Request("ref", ids, params, MAX_TOKENS, frozenset(codec.eos_ids if stops is None else stops))
    state = pipeline(tiny_dir, "pp", 1).generate(req)
    return codec.decode(state.output), state.output, state.logprobs


def _params(base: str, fields: dict) -> SamplingParams:
    b = BASES[base]
    return SamplingParams(temperature=b["temperature"], seed=b.get("seed", 0), **fields)


def _stream(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _streamed_texts(chunks: list[dict], chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ((ch["delta"].get("content") or "") if chat else ch["text"])
    return texts


@pytest.mark.parametrize("policy", ["specpipe", "tree"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_equals_plain_decoding_through_the_services(client, tiny_dir, option, base, policy) -> None:
    fields, ref_fields = OPTIONS[option]
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, **BASES[base], **fields,
            "speculation": {"policy": policy}}
    text, _, _ = reference(tiny_dir, tuple(_codec(tiny_dir).encode(PROMPT)), _params(base, ref_fields))
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text
    assert _streamed_texts(_stream(client, "/v1/completions", body), chat=False) == {0: text}
    plain, _, _ = reference(tiny_dir, tuple(_codec(tiny_dir).encode(PROMPT)), _params(base, {}))
    assert text != plain or option == "min_p" and base == "greedy"  # the option is seen (min_p: argmax-invariant)


def test_n_choices_are_seed_plus_index_streamed_or_not(client, tiny_dir) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.3, "seed": 40, "n": 3}
    ids = tuple(_codec(tiny_dir).encode(PROMPT))
    expected = {i: reference(tiny_dir, ids, SamplingParams(temperature=0.3, seed=40 + i))[0] for i in range(3)}
    r = client.post("/v1/completions", json=body)
    assert {c["index"]: c["text"] for c in r.json()["choices"]} == expected
    assert len(set(expected.values())) > 1
    chunks = _stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert _streamed_texts(chunks, chat=False) == expected
    assert chunks[-1]["usage"]["prompt_tokens"] == len(ids) == r.json()["usage"]["prompt_tokens"]


BATCHES = {"strings": ["Pipelines are", "The quick brown"], "token ids": [[5, 17, 99, 3], [300, 301, 300]]}


@pytest.mark.parametrize("kind", list(BATCHES))
def test_batched_prompts_and_echo(client, tiny_dir, kind) -> None:
    prompts = BATCHES[kind]
    body = {"model": MODEL_NAME, "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "echo": True}
    codec = _codec(tiny_dir)
    ids = [tuple(p) if isinstance(p, list) else tuple(codec.encode(p)) for p in prompts]
    echoes = [p if isinstance(p, str) else codec.decode(p) for p in prompts]
    expected = {i: echoes[i] + reference(tiny_dir, ids[i], SamplingParams())[0] for i in range(2)}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert {c["index"]: c["text"] for c in r.json()["choices"]} == expected
    assert _streamed_texts(_stream(client, "/v1/completions", body), chat=False) == expected
    assert r.json()["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


def test_chat_logprobs_are_the_references(client, tiny_dir) -> None:
    messages = [{"role": "user", "content": "Count to three."}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    codec = _codec(tiny_dir)
    _, tokens, logprobs = reference(tiny_dir, tuple(codec.encode_chat(messages)), SamplingParams(logprobs=2))
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [codec.token_text(t) for t in tokens]
    assert [e["logprob"] for e in content] == pytest.approx([lp.logprob for lp in logprobs], abs=1e-4)
    assert [[t["token"] for t in e["top_logprobs"]] for e in content] == [
        [codec.token_text(i) for i in lp.top_ids] for lp in logprobs]
    streamed = [e for c in _stream(client, "/v1/chat/completions", body) for ch in c["choices"]
                if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]


def test_completion_logprobs_shape(client, tiny_dir) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) > 0
    assert all(len(top) <= 3 and max(top.values()) >= v - 1e-6 for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0


def test_ignore_eos_and_stop_token_ids(client, tiny_dir) -> None:
    codec = _codec(tiny_dir)
    ids = tuple(codec.encode(PROMPT))
    _, tokens, _ = reference(tiny_dir, ids, SamplingParams(), stops=())
    stop = tokens[3]
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stop_token_ids": [stop]}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    expected = tokens[: tokens.index(stop) + 1]
    assert choice["text"] == codec.decode(expected) and choice["finish_reason"] == "stop"


# llguidance validates it without a tokenizer, but tiny-random's tokenizer has no such token: the last stage's
# matcher refuses it when it registers the request (the gateway would refuse it too; hence a RequestMsg here)
UNUSABLE_GRAMMAR = json.dumps({"grammars": [{"lark_grammar": 'start: <|no_such_token|> "a"'}]})


def _shared_a_micro_batch(cluster, a: str, b: str) -> bool:
    """Whether some stage computed rows of both requests in one step (the occupancy grid the scheduler
    publishes, final once the step's verification is known)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        columns = [decode(f[b"m"], OccupancyMsg) for _, f in cluster.r.xrevrange(cluster.cfg.occupancy, count=500)]
        if any({a, b} <= {cell[0] for cell in stage} for column in columns for stage in column.stages):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("base", list(BASES))
def test_a_request_a_stage_refuses_fails_alone(client, cluster, tiny_dir, base) -> None:
    ids = list(_codec(tiny_dir).encode(PROMPT))
    _, tokens, _ = reference(tiny_dir, tuple(ids), _params(base, {}))
    good, bad = (f"{name}-{base}-{uuid.uuid4().hex[:6]}" for name in ("good", "bad"))
    requests = [RequestMsg(good, ids, MAX_TOKENS, SamplingFields.of(_params(base, {}))),
                RequestMsg(bad, ids, MAX_TOKENS, SamplingFields.of(_params(base, {"grammar": UNUSABLE_GRAMMAR})))]
    with cluster.r.pipeline(transaction=True) as pipe:  # MULTI/EXEC: the scheduler reads both at once, admits
        for msg in requests:                             # them together, and their prompts share a micro-batch
            pipe.xadd(cluster.cfg.requests, {"m": msg.encode()})
        pipe.execute()
    ok, refused = (collect(cluster.r, cluster.cfg, rid, timeout_s=120) for rid in (good, bad))
    assert ok.finished and ok.finish_reason == "length" and ok.error is None
    assert ok.tokens == tokens  # what plain decoding gives it alone
    assert refused.finish_reason == "error" and refused.tokens == []
    assert refused.error.startswith("stage 1: grammar refused:") and "no_such_token" in refused.error
    assert "Traceback" not in refused.error
    assert _shared_a_micro_batch(cluster, good, bad)
    status = client.get(f"/v1/requests/{bad}").json()  # what a client polling it sees
    assert status["status"] == "failed" and status["error"] == refused.error
