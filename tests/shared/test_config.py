"""Component configs refuse bad values with a ConfigError that names the setting (never a traceback later)."""

from __future__ import annotations

import argparse

import pytest

from scheduler.service import SchedulerServiceConfig
from shared.service_args import add_policy_args, policy_config
from shared.transport.redis_io import RedisConfig
from shared.types.config import EngineConfig, ModelArch, PolicyConfig, default_refill_depth, split_layers, stage_bounds
from shared.types.errors import ConfigError

pytestmark = pytest.mark.unit

# label: (constructor, message)
BAD = {
    "engine dtype": (lambda: EngineConfig(dtype="float64"), "dtype 'float64'"),
    "draft dtype": (lambda: EngineConfig(draft_dtype="int8"), "draft_dtype 'int8'"),
    "negative draft vocabulary": (lambda: EngineConfig(draft_vocab=-1), "draft_vocab must be 0"),
    "too small a draft vocabulary": (lambda: EngineConfig(draft_vocab=8), "or at least 256"),
    "a negative n-gram table across requests": (lambda: EngineConfig(ngram_shared=-1), "ngram_shared must be >= 0"),
    "prefill chunk 0": (lambda: EngineConfig(prefill_chunk=0), "prefill_chunk must be >= 1"),
    "token budget 0": (lambda: EngineConfig(token_budget=0), "token_budget must be >= 1"),
    "width 0": (lambda: PolicyConfig("specpipe", 2, 0), "width must be >= 1"),
    "layer split word": (lambda: EngineConfig(layer_split="uneven"), "layer split 'uneven'"),
    "negative draft wait": (
        lambda: SchedulerServiceConfig(RedisConfig(), 2, draft_wait_s=-0.1), "draft wait must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_refused(case) -> None:
    make, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        make()


def test_bf16_draft_is_a_valid_setting() -> None:
    assert EngineConfig(draft_dtype="bfloat16").draft_dtype == "bfloat16"


def _arch(layers: int, vocab: int, hidden: int = 64, intermediate: int = 128) -> ModelArch:
    return ModelArch(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_eps=1e-6, tie_embeddings=True,
                     qkv_bias=False, max_positions=256, eos_token_ids=(0,))


# label: (layers, stages, head in layers' worth, the cut)
SPLITS = {
    "one stage holds all": (30, 1, 8.0, [(0, 30)]),
    "no head weight: even, extra layers first": (10, 3, 0.0, [(0, 4), (4, 7), (7, 10)]),
    "smollm2-135m shape at 2: 19 + 11 and the head (19 vs 23 even)": (30, 2, 8.0, [(0, 19), (19, 30)]),
    "a light head only trims the last stage": (80, 8, 1.23, [(0, 11), *((11 + 10 * i, 21 + 10 * i) for i in range(6)),
                                                            (71, 80)]),
    "a head past every layer keeps one layer last": (8, 2, 85.0, [(0, 7), (7, 8)]),
    "a tie keeps the cut nearer even": (28, 2, 5.0, [(0, 16), (16, 28)]),
}


@pytest.mark.parametrize("case", list(SPLITS))
def test_split_layers_lightens_the_heaviest_stage(case) -> None:
    layers, stages, head, expected = SPLITS[case]
    bounds = split_layers(layers, stages, head)
    assert bounds == [tuple(b) for b in expected]
    heaviest = max(b - a + (head if k == stages - 1 else 0) for k, (a, b) in enumerate(bounds))
    even = max(b - a + (head if k == stages - 1 else 0) for k, (a, b) in enumerate(split_layers(layers, stages)))
    assert heaviest <= even


# label: (split, the cut of a 12-layer model whose head weighs 4 layers, or the error)
STAGE_BOUNDS = {
    "balanced": ("balanced", [(0, 8), (8, 12)]),
    "even": ("even", [(0, 6), (6, 12)]),
    "counts": ("5,7", [(0, 5), (5, 12)]),
    "counts that miss layers": ("5,6", "add up to the model's 12 layers"),
    "too few counts": ("12", "2 counts"),
    "not a rule": ("heavy", "choose balanced or even"),
    "the launcher's rule": ("measured", "the launcher's"),
}


@pytest.mark.parametrize("case", list(STAGE_BOUNDS))
def test_stage_bounds_by_rule_or_counts(case) -> None:
    split, expected = STAGE_BOUNDS[case]
    arch = _arch(12, vocab=_arch(1, 1).layer_params * 4 // 64)  # head = vocab x hidden = 4 layers' weights
    assert arch.head_params == 4 * arch.layer_params
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            stage_bounds(arch, 2, split)
    else:
        assert stage_bounds(arch, 2, split) == expected


# label: (stage processes, the services' refill depth when none is given)
REFILLS = {"one stage": (1, 2), "2 stages": (2, 2), "3 stages": (3, 2), "4 stages": (4, 3), "8 stages": (8, 7)}


@pytest.mark.parametrize("case", list(REFILLS))
def test_the_services_refill_depth_defaults_to_stages_less_one_and_two_at_least(case) -> None:
    stages, depth = REFILLS[case]
    assert default_refill_depth(stages) == depth
    p = argparse.ArgumentParser()
    add_policy_args(p)
    assert policy_config(p.parse_args(["--stages", str(stages)])).refill_depth == depth
    assert policy_config(p.parse_args(["--stages", str(stages), "--refill-depth", "5"])).refill_depth == 5
