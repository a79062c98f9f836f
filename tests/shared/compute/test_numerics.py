"""Numerics `fast` (one GEMM per micro-batch, one masked SDPA call per request): the same model up to rounding.

Exact mode stays bit-identical (tests/shared/compute/test_invariance.py); fast mode is checked to compute the same
function: a random tree's hidden states and logits agree with exact mode's within fp32 rounding, and the
in-process pipeline's greedy tokens agree with plain decoding (divergence only at near-ties, counted here).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.compute.runner import StageRunner, load_stage
from shared.types.batch import MicroBatch
from shared.types.config import ModelArch, SamplingParams
from shared.types.errors import ConfigError
from tests.shared.compute.trees import prefill, random_tree, tree_rows

pytestmark = pytest.mark.unit


def _runner(model_dir, numerics: str) -> StageRunner:
    return load_stage(model_dir, ModelArch.from_model_dir(model_dir), 0, 1, numerics=numerics)


def _tree_states(runner: StageRunner, prompt: list[int], tree: tuple[list[int], list[int], list[int]]):
    prefill(runner, "r", prompt)
    return runner.hidden(MicroBatch(1, tree_rows("r", len(prompt), *tree)))


@settings(max_examples=15, deadline=None)
@given(
    prompt=st.lists(st.integers(3, 400), min_size=1, max_size=40),
    parents=st.lists(st.integers(0, 10), min_size=1, max_size=12),
    seed=st.integers(0, 1000),
)
def test_fast_tree_matches_exact_within_rounding(tiny_dir, prompt, parents, seed) -> None:
    tree = random_tree(parents, seed)
    exact, fast = _runner(tiny_dir, "exact"), _runner(tiny_dir, "fast")
    a, b = _tree_states(exact, prompt, tree), _tree_states(fast, prompt, tree)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.logits(b), exact.logits(a), rtol=1e-4, atol=1e-4)


def test_unknown_numerics_is_a_clear_error(tiny_dir) -> None:
    with pytest.raises(ConfigError, match="unknown numerics 'turbo'"):
        _runner(tiny_dir, "turbo")


# label: (policy, stages)
PIPELINES = {"pp, 1 stage": ("pp", 1), "tree, 2 stages": ("tree", 2), "specpipe, 4 stages": ("specpipe", 4)}


@pytest.mark.parametrize("case", list(PIPELINES))
def test_fast_pipeline_greedy_tokens_agree_with_plain_decoding(tiny_dir, case) -> None:
    """tiny-random's logits are far from ties, so every token agrees here; on real models fast mode's divergence
    rate is measured by the benchmarks, not asserted."""
    from scheduler.scheduler import Request
    from tests.helpers import pipeline

    policy, stages = PIPELINES[case]
    prompts = [[5, 17, 99, 3, 5, 17, 42, 7], list(range(40, 90)), [300, 301, 300, 301, 300]]
    for i, prompt in enumerate(prompts):
        plain = pipeline(tiny_dir, "pp", 1).generate(Request(f"p{i}", tuple(prompt), SamplingParams(), 16)).output
        fast = pipeline(tiny_dir, policy, stages, numerics="fast")
        assert fast.generate(Request(f"f{i}", tuple(prompt), SamplingParams(), 16)).output == plain
