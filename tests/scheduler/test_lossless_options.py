"""Every sampling option is lossless: tree and specpipe give plain decoding's tokens (and logprobs) with it.

Plain decoding = pp on one stage. Each option must also change the output (or, for logprobs, report something),
so that a test here could fail if the option were ignored.
"""

from __future__ import annotations

import json
from dataclasses import replace

import llguidance
import pytest

from shared.types.config import ModelArch, SamplingParams
from shared.types.structured import grammar_of
from tests.helpers import generate, pipeline

PROMPT = [5, 17, 99, 3, 5, 17, 42, 7, 5, 17, 99, 3]
N = 16
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
          "required": ["a", "b"], "additionalProperties": False}
OPTIONS = {
    "min_p": {"min_p": 0.3},
    "logit_bias": {"logit_bias": ((5, 100.0), (17, 8.0), (42, -100.0))},
    # negative / below-1 penalties make tiny-random repeat, so that the penalties change its output (the positive
    # direction is checked against a reference in tests/shared/compute/test_processing.py)
    "presence": {"presence_penalty": -2.0},
    "frequency": {"frequency_penalty": -1.5},
    "repetition": {"repetition_penalty": 0.5},
    "penalties": {"presence_penalty": -1.0, "frequency_penalty": 0.7, "repetition_penalty": 0.6},
    "json_schema": {"grammar": grammar_of({"type": "json_schema", "json_schema": {"schema": SCHEMA}})},
    "json_object": {"grammar": grammar_of({"type": "json_object"})},
    "logprobs": {"logprobs": 3},
}
BASES = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=0.3, seed=11)}  # tiny-random is near uniform
POLICIES = [("tree", 2, "self"), ("specpipe", 3, "self")]  # the draft knows no option: it misses often


def _run(model_dir, policy: str, stages: int, draft: str, params: SamplingParams):
    draft = str(model_dir) if draft == "self" else draft
    return generate(pipeline(model_dir, policy, stages, draft, width=3, refill_depth=3), PROMPT, N, params)


@pytest.fixture(scope="module")
def plain(tiny_dir):
    """pp's output and logprobs for every (option, base), computed once."""
    cache = {}

    def get(option: str | None, base: str):
        if (option, base) not in cache:
            params = replace(BASES[base], **(OPTIONS[option] if option else {}))
            state = _run(tiny_dir, "pp", 1, "ngram", params)
            cache[option, base] = (state.output, _logprobs(state))
        return cache[option, base]

    return get


def _logprobs(state) -> list:
    return [(lp.logprob, lp.top_ids) for lp in state.logprobs]


@pytest.mark.unit
@pytest.mark.parametrize("base", list(BASES), ids=list(BASES))
@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("policy,stages,draft", POLICIES, ids=[f"{p}-N{n}-{d}" for p, n, d in POLICIES])
def test_option_is_lossless_under_speculation(tiny_dir, plain, policy, stages, draft, option, base) -> None:
    expected, expected_logprobs = plain(option, base)
    params = replace(BASES[base], **OPTIONS[option])
    state = _run(tiny_dir, policy, stages, draft, params)
    assert state.output == expected
    assert _logprobs(state) == expected_logprobs
    if option == "logprobs":
        assert len(expected_logprobs) == len(expected) and all(len(ids) == 3 for _, ids in expected_logprobs)
    elif not (option == "min_p" and base == "greedy"):  # min_p keeps the most likely token: argmax-invariant
        assert expected != plain(None, base)[0], f"{option} did not change the output: the test would not see it"


@pytest.mark.unit
@pytest.mark.parametrize("option", ["json_schema", "json_object"])
def test_grammar_output_stays_in_the_grammar(tiny_dir, plain, option) -> None:
    """Every token the target chose was allowed: the output is in the grammar, and once the JSON is complete
    and end-of-sequence chosen (nothing stops this request there), only end-of-sequence follows."""
    output, _ = plain(option, "seeded")
    eos = ModelArch.from_model_dir(tiny_dir).eos_token_ids
    tokenizer = llguidance.LLTokenizer((tiny_dir / "tokenizer.json").read_text(), n_vocab=49152, eos_token=list(eos))
    matcher = llguidance.LLMatcher(tokenizer, OPTIONS[option]["grammar"], log_level=0)
    valid = matcher.validate_tokens(output)
    assert valid == len(output) or (matcher.consume_tokens(output[:valid]) and matcher.is_stopped()
                                    and set(output[valid:]) <= set(eos))
    if eos[0] in output:
        value = json.loads(tokenizer.decode_str(output[: output.index(eos[0])]))
        assert isinstance(value, dict) and (option == "json_object" or set(value) == {"a", "b"})


@pytest.mark.unit
def test_logprobs_are_the_raw_models(tiny_dir, plain) -> None:
    """The chosen token's logprob is in the raw distribution: the top-3 are sorted and the greedy pick is first."""
    output, logprobs = plain("logprobs", "greedy")
    for token, (logprob, ids) in zip(output, logprobs):
        assert ids[0] == token and logprob <= 0
    assert json.dumps(logprobs)  # plain data


PEOPLE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
                 "properties": {"name": {"type": "string", "maxLength": 24},
                                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                "city": {"type": "string", "maxLength": 24}}}
TOPICS = ["a pirate", "a chef", "a nurse", "an astronaut", "a farmer", "a poet", "a pilot", "a baker", "a judge",
          "a painter", "a miner", "a sailor", "a teacher", "a dancer", "a monk", "a knight", "a clown", "a coder",
          "a doctor", "a spy"]


@pytest.mark.slow
def test_json_schema_is_valid_and_lossless_smollm2(smollm2_dir) -> None:
    """20 prompts with a JSON schema: specpipe's tokens are pp's, and each output is JSON the schema describes."""
    from scheduler.scheduler import Request
    from shared.model_store import load_tokenizer
    from specpipe.prompts import encode_chat

    tokenizer = load_tokenizer(smollm2_dir)
    eos = frozenset(ModelArch.from_model_dir(smollm2_dir).eos_token_ids)
    params = SamplingParams(grammar=grammar_of({"type": "json_schema", "json_schema": {"schema": PEOPLE_SCHEMA}}))
    runs = {}
    for policy, stages in (("pp", 1), ("specpipe", 2)):  # the 20 requests batched together (SpecPipe-DB)
        pipe = pipeline(smollm2_dir, policy, stages, "ngram", width=3)
        states = [pipe.submit(Request(f"q{i}", tuple(encode_chat(tokenizer, f"Describe {topic} as JSON with a name, an age "
                                                               "and a city.")), params, 48, eos))
                  for i, topic in enumerate(TOPICS)]
        pipe.run()
        runs[policy] = states
    for topic, expected, got in zip(TOPICS, runs["pp"], runs["specpipe"]):
        assert got.output == expected.output, topic
        assert expected.finish_reason == "stop", topic
        value = json.loads(tokenizer.decode(expected.output[:-1]))
        assert set(value) == {"name", "age", "city"} and 0 <= value["age"] <= 120
