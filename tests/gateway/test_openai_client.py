"""The official `openai` client against a real gateway + cluster (tiny-random, 2 stages, specpipe + n-grams).

Every text must equal the in-process reference (plain decoding with the same
sampling, decoded the gateway's way), streamed or not.
"""

from __future__ import annotations

import functools

import pytest
from openai import OpenAI

from gateway.codec import TextCodec
from shared.types.config import SamplingParams
from tests.gateway.conftest import MODEL_NAME
from tests.helpers import pipeline

pytestmark = pytest.mark.multiproc
SAMPLING = [(0.0, None), (0.8, 1234)]  # (temperature, seed)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about pipelines."}]
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"


@functools.lru_cache(maxsize=None)
def _codec(tiny_dir) -> TextCodec:
    return TextCodec(tiny_dir)


@functools.lru_cache(maxsize=None)
def reference(tiny_dir, prompt_ids: tuple[int, ...], n: int, temperature: float, seed: int) -> tuple[str, int]:
    """(text, completion tokens) of in-process plain decoding with the model's eos as stop ids."""
    from scheduler.scheduler import Request

    codec = _codec(tiny_dir)
    sampling = SamplingParams(temperature, 1.0, 0, seed)
    req = Request("ref", prompt_ids, sampling, n, frozenset(codec.eos_ids))
    out = pipeline(tiny_dir, "pp", 1).generate(req).output
    return codec.decode(out), len(out)


@pytest.fixture
def oai(gateway) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _sampling(temperature: float, seed: int | None) -> dict:
    return {"temperature": temperature, **({"seed": seed} if seed is not None else {})}


@pytest.mark.parametrize("temperature,seed", SAMPLING, ids=["greedy", "seeded"])
def test_chat_stream_and_full_equal_reference(oai, tiny_dir, temperature, seed) -> None:
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, **_sampling(temperature, seed))
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = tuple(_codec(tiny_dir).encode_chat(MESSAGES))
    text, n = reference(tiny_dir, ids, 12, temperature, seed or 0)
    assert full.choices[0].message.content == streamed == text
    assert full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == n
    assert full.usage.total_tokens == len(ids) + n
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n  # include_usage
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason] and finish[0] in ("stop", "length")
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


@pytest.mark.parametrize("temperature,seed", SAMPLING, ids=["greedy", "seeded"])
def test_completion_stream_and_full_equal_reference(oai, tiny_dir, temperature, seed) -> None:
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, **_sampling(temperature, seed))
    full = oai.completions.create(**kw)
    chunks = list(oai.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].text for c in chunks)
    text, n = reference(tiny_dir, tuple(_codec(tiny_dir).encode(PROMPT)), 12, temperature, seed or 0)
    assert full.choices[0].text == streamed == text
    assert full.usage.completion_tokens == n and full.object == "text_completion"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_token_id_prompt_and_speculation_extension_are_lossless(oai, tiny_dir) -> None:
    ids = [5, 17, 99, 3, 5, 17, 42, 7]
    text, _ = reference(tiny_dir, tuple(ids), 8, 0.0, 0)
    for spec in (None, {"policy": "pp"}, {"policy": "tree", "width": 2}, {"policy": "specpipe", "width": 1}):
        extra = {"speculation": spec} if spec else None
        out = oai.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0, extra_body=extra)
        assert out.choices[0].text == text, spec
        assert out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_stop_string_cuts_output(oai, tiny_dir, stream) -> None:
    text, _ = reference(tiny_dir, tuple(_codec(tiny_dir).encode(PROMPT)), 12, 0.0, 0)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "\x00never"])
    if stream:
        chunks = list(oai.completions.create(stream=True, **kw))
        got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        out = oai.completions.create(**kw)
        got, reason = out.choices[0].text, out.choices[0].finish_reason
    assert got == expected and reason == "stop"


def test_models_endpoint(oai) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert oai.models.retrieve(MODEL_NAME).id == MODEL_NAME
