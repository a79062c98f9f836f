"""Lossless: every policy and stage count gives exactly plain decoding's tokens.

Plain decoding = one token at a time through the whole model (pp, one stage),
which itself is checked against transformers' own greedy `generate`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.model_store import load_tokenizer
from shared.types.config import ModelArch, SamplingParams
from specpipe.prompts import encode_chat
from tests.conftest import PROMPTS_DIR
from tests.helpers import generate, pipeline

TINY_PROMPT = [5, 17, 99, 3, 5, 17, 42, 7, 5, 17, 99, 3]
SAMPLINGS = {
    "greedy": SamplingParams(),
    "sampled": SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7),
    "hot": SamplingParams(temperature=1.5, seed=123),
}
SPECULATIVE = [("tree", "ngram"), ("tree", "self"), ("specpipe", "ngram"), ("specpipe", "self")]


def _draft(name: str, model_dir) -> str:
    return str(model_dir) if name == "self" else name


def _hf_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    eos = ModelArch.from_model_dir(model_dir).eos_token_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=list(eos) or None)
    return out[0, len(prompt):].tolist()


def _plain(model_dir, prompt, n, sampling, stop=()) -> list[int]:
    pipe = pipeline(model_dir, "pp", 1)
    return pipe.generate(_request(prompt, n, sampling, stop)).output


def _request(prompt, n, sampling, stop=()):
    from scheduler.scheduler import Request

    return Request("r", tuple(prompt), sampling, n, frozenset(stop))


@pytest.mark.unit
def test_plain_decoding_matches_transformers_generate_tiny(tiny_dir) -> None:
    eos = ModelArch.from_model_dir(tiny_dir).eos_token_ids
    assert _plain(tiny_dir, TINY_PROMPT, 24, SamplingParams(), eos) == _hf_greedy(tiny_dir, TINY_PROMPT, 24)


@pytest.mark.unit
@pytest.mark.parametrize("sampling", list(SAMPLINGS), ids=list(SAMPLINGS))
@pytest.mark.parametrize("stages", [1, 2, 4, 8], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("policy,draft", [("pp", "ngram"), *SPECULATIVE], ids=lambda x: str(x))
def test_every_policy_equals_plain_decoding_tiny(tiny_dir, policy, draft, stages, sampling) -> None:
    params = SAMPLINGS[sampling]
    expected = _plain(tiny_dir, TINY_PROMPT, 20, params)
    state = generate(pipeline(tiny_dir, policy, stages, _draft(draft, tiny_dir), refill_depth=3), TINY_PROMPT, 20, params)
    assert state.output == expected
    if policy == "pp":
        assert state.stats.steps == (len(expected) - 1) * stages  # one token per N steps
    if draft == "self" and params.greedy and stages > 1:
        assert state.stats.accepted > 0  # a perfect draft must be accepted


@pytest.mark.unit
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("policy,stages", [("tree", 2), ("specpipe", 2), ("specpipe", 4)], ids=str)
def test_bf16_draft_stays_lossless_tiny(tiny_dir, policy, stages, sampling) -> None:
    """The draft only proposes: in bf16 it proposes differently, and the fp32 target's tokens do not change."""
    params = SAMPLINGS[sampling]
    expected = _plain(tiny_dir, TINY_PROMPT, 20, params)
    pipe = pipeline(tiny_dir, policy, stages, str(tiny_dir), draft_dtype="bfloat16", refill_depth=3)
    assert pipe.draft.runner.dtype == torch.bfloat16
    state = generate(pipe, TINY_PROMPT, 20, params)
    assert state.output == expected


@pytest.mark.unit
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("policy,stages", [("tree", 2), ("specpipe", 2), ("specpipe", 4)], ids=str)
def test_a_subset_draft_head_stays_lossless_tiny(tiny_dir, policy, stages, sampling) -> None:
    """The draft's head scores 1,000 of 49,152 tokens (draft_vocab): it cannot propose the rest, and the target's
    tokens do not change."""
    params = SAMPLINGS[sampling]
    expected = _plain(tiny_dir, TINY_PROMPT, 20, params)
    pipe = pipeline(tiny_dir, policy, stages, str(tiny_dir), draft_vocab=1000, refill_depth=3)
    assert pipe.draft.runner.weights.lm_head.shape[0] == 1000
    state = generate(pipe, TINY_PROMPT, 20, params)
    assert state.output == expected


@pytest.mark.unit
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("stages", [2, 4], ids=lambda n: f"N{n}")
def test_an_ngram_table_across_requests_stays_lossless_tiny(tiny_dir, stages, sampling) -> None:
    """The n-gram draft falls back on the text of requests that finished (ngram_shared): the same prompt served
    again drafts from the first one's output, and the tokens are plain decoding's both times."""
    params = SAMPLINGS[sampling]
    expected = _plain(tiny_dir, TINY_PROMPT, 24, params)
    pipe = pipeline(tiny_dir, "specpipe", stages, "ngram", refill_depth=2, ngram_shared=1024)
    first = generate(pipe, TINY_PROMPT, 24, params, rid="first")
    assert len(pipe.draft.shared.texts) == 1
    second = generate(pipe, TINY_PROMPT, 24, params, rid="second")
    assert first.output == second.output == expected
    assert second.stats.accepted > first.stats.accepted


@pytest.mark.unit
@pytest.mark.parametrize("sampling", ["greedy", "hot"])
@pytest.mark.parametrize("stages", [1, 2, 4], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("policy,draft", [("pp", "ngram"), ("specpipe", "ngram"), ("specpipe", "self")], ids=str)
def test_async_scheduling_equals_plain_decoding_tiny(tiny_dir, policy, draft, stages, sampling) -> None:
    """Each step scheduled before the verification of the one before it is read (rows and prunes one
    verification late): the tokens are plain decoding's, and a root takes one more step per token."""
    params = SAMPLINGS[sampling]
    expected = _plain(tiny_dir, TINY_PROMPT, 20, params)
    pipe = pipeline(tiny_dir, policy, stages, _draft(draft, tiny_dir), refill_depth=2, async_scheduling=True)
    state = generate(pipe, TINY_PROMPT, 20, params)
    assert state.output == expected
    if policy == "pp":
        assert state.stats.steps == (len(expected) - 1) * (stages + 1)  # one token per N + 1 steps
    if draft == "self" and params.greedy and stages > 1:
        assert state.stats.accepted > 0


@pytest.mark.unit
def test_sampling_seed_changes_output(tiny_dir) -> None:
    a = _plain(tiny_dir, TINY_PROMPT, 12, SamplingParams(temperature=1.0, seed=1))
    b = _plain(tiny_dir, TINY_PROMPT, 12, SamplingParams(temperature=1.0, seed=2))
    assert a != b


def _mt_bench_prompts(model_dir, k: int) -> list[list[int]]:
    import json

    tokenizer = load_tokenizer(model_dir)
    lines = (PROMPTS_DIR / "mt_bench.jsonl").read_text().splitlines()[:k]
    return [encode_chat(tokenizer, json.loads(line)["turns"][0]) for line in lines]


@pytest.mark.slow
def test_plain_decoding_matches_transformers_generate_smollm2(smollm2_dir) -> None:
    eos = ModelArch.from_model_dir(smollm2_dir).eos_token_ids
    for prompt in _mt_bench_prompts(smollm2_dir, 2):
        assert _plain(smollm2_dir, prompt, 32, SamplingParams(), eos) == _hf_greedy(smollm2_dir, prompt, 32)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["greedy", "sampled"], ids=["greedy", "sampled"])
@pytest.mark.parametrize(
    "policy,stages,draft",
    [("pp", 4, "ngram"), ("tree", 2, "ngram"), ("tree", 8, "self"), ("specpipe", 2, "ngram"),
     ("specpipe", 4, "self"), ("specpipe", 8, "ngram")],
    ids=lambda x: str(x),
)
def test_policies_equal_plain_decoding_smollm2(smollm2_dir, policy, stages, draft, sampling) -> None:
    params = SAMPLINGS[sampling]
    prompt = _mt_bench_prompts(smollm2_dir, 1)[0]
    expected = _plain(smollm2_dir, prompt, 24, params)
    state = generate(pipeline(smollm2_dir, policy, stages, _draft(draft, smollm2_dir), width=4), prompt, 24, params)
    assert state.output == expected


@pytest.mark.slow
def test_bf16_self_draft_is_accepted_and_lossless_smollm2(smollm2_dir) -> None:
    """A real model drafting for itself in bf16: mostly accepted, and the output is still plain decoding's."""
    prompt = _mt_bench_prompts(smollm2_dir, 1)[0]
    expected = _plain(smollm2_dir, prompt, 24, SamplingParams())
    pipe = pipeline(smollm2_dir, "specpipe", 4, str(smollm2_dir), width=4, draft_dtype="bfloat16")
    state = generate(pipe, prompt, 24)
    assert state.output == expected
    assert state.stats.accepted >= len(expected) // 2  # bf16 rounding rarely changes a greedy choice


@pytest.mark.unit
@pytest.mark.parametrize("policy", ["pp", "tree", "specpipe"])
def test_concurrent_requests_equal_solo_runs(tiny_dir, policy) -> None:
    """SpecPipe-DB: requests join while others decode, mixed sampling, a tight token budget."""
    from scheduler.scheduler import Request

    jobs = [
        (TINY_PROMPT, 14, SAMPLINGS["greedy"], 0),
        ([7, 7, 8, 9, 7, 7, 8], 9, SAMPLINGS["sampled"], 0),
        (list(range(40, 80)), 11, SAMPLINGS["hot"], 3),  # a long prompt, chunked prefill shares steps
        ([300, 301, 300, 301, 300], 6, SAMPLINGS["greedy"], 7),
    ]
    solo = [_plain(tiny_dir, p, n, s) for p, n, s, _ in jobs]
    pipe = pipeline(tiny_dir, policy, 4, str(tiny_dir), width=4, chunk=8, budget=12, refill_depth=2)
    states, widths = {}, set()
    for step in range(2000):
        for i, (prompt, n, sampling, arrive) in enumerate(jobs):
            if arrive == step:
                states[i] = pipe.submit(Request(f"q{i}", tuple(prompt), sampling, n))
        if len(states) == len(jobs) and all(s.finish_reason for s in states.values()):
            break
        widths.add(pipe.scheduler.effective_width())
        pipe.step()
    assert [states[i].output for i in range(len(jobs))] == solo
    assert min(widths) < 4  # the width shrank under load
