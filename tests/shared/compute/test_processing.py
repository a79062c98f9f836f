"""Logits processing against straightforward references: transformers' processors where the semantics match
(repetition penalty, min_p, logit bias), the OpenAI/vLLM formula written out for presence and frequency."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from shared.compute.processing import NodeContext, penalize, process
from shared.compute.sampling import filtered_probs
from shared.types.config import SamplingParams
from shared.types.errors import ConfigError

pytestmark = pytest.mark.unit
V = 64
PROMPT = [1, 2, 3, 3, 9]
OUTPUT = [4, 4, 4, 9, 10, 2]


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0], ids=lambda p: f"rep{p}")
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    x = _logits()
    ours = penalize(x, PROMPT, OUTPUT, SamplingParams(repetition_penalty=penalty))
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([PROMPT + OUTPUT]), x[None].clone())[0]
    assert torch.equal(ours, theirs)


PRESENCE_FREQUENCY = {"presence": (1.5, 0.0), "frequency": (0.0, 0.7), "both": (-0.5, 1.2), "negative": (-2.0, -2.0)}


@pytest.mark.parametrize("name", list(PRESENCE_FREQUENCY))
def test_presence_and_frequency_follow_openais_formula(name: str) -> None:
    """logit[t] - count[t] * frequency - (count[t] > 0) * presence, counting generated tokens only."""
    presence, frequency = PRESENCE_FREQUENCY[name]
    x = _logits(1)
    expected = x.clone()
    for t in set(OUTPUT):
        expected[t] -= OUTPUT.count(t) * frequency + presence
    ours = penalize(x, PROMPT, OUTPUT, SamplingParams(presence_penalty=presence, frequency_penalty=frequency))
    assert torch.allclose(ours, expected)
    assert torch.equal(ours[3], x[3])  # a prompt-only token is not penalized


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_what_transformers_keeps(min_p: float) -> None:
    x = _logits(2)
    params = SamplingParams(temperature=0.7, min_p=min_p)
    kept = filtered_probs(x, params) > 0
    theirs = MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), (x / 0.7)[None])[0] > float("-inf")
    assert torch.equal(kept, theirs)


def test_logit_bias_adds_to_each_token_as_a_sequence_bias_does() -> None:
    x = _logits(3)
    bias = ((5, 100.0), (7, -100.0), (11, 2.5))
    theirs = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})(torch.tensor([[1]]), x[None].clone())[0]
    assert torch.equal(process(x, SamplingParams(logit_bias=bias), None), theirs)


def test_grammar_mask_comes_first_and_stays_masked() -> None:
    x = _logits(4)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[4, 8]] = True
    params = SamplingParams(logit_bias=((9, 100.0),), repetition_penalty=1.5, frequency_penalty=1.0)
    out = process(x, params, NodeContext(PROMPT, OUTPUT, allowed))
    assert torch.isfinite(out).nonzero().flatten().tolist() == [4, 8]


BAD = {"min_p": {"min_p": 1.5}, "presence": {"presence_penalty": 2.5}, "frequency": {"frequency_penalty": -3.0},
       "repetition": {"repetition_penalty": 0.0}, "bias": {"logit_bias": ((1, 101.0),)}, "logprobs": {"logprobs": -1}}


@pytest.mark.parametrize("name", list(BAD))
def test_out_of_range_settings_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**BAD[name])
