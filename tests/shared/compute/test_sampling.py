"""The target's choice: a batch of rows (greedy ones by one argmax, seeded ones drawn on the CPU) picks what each
row alone would, and a seeded draw depends only on (seed, output position)."""

from __future__ import annotations

import pytest
import torch

from shared.compute.sampling import target_token, target_tokens
from shared.types.config import SamplingParams

pytestmark = pytest.mark.unit

# label: the rows' sampling (g: greedy, s: seeded)
MIXES = {"all greedy": "gggg", "all seeded": "ssss", "mixed": "gsgs", "one seeded": "s"}


@pytest.mark.parametrize("mix", list(MIXES))
def test_batch_picks_what_each_row_alone_picks(mix: str) -> None:
    kinds = MIXES[mix]
    logits = torch.randn(len(kinds), 1000, generator=torch.Generator().manual_seed(5)) * 2
    params = [SamplingParams() if k == "g" else SamplingParams(temperature=0.9, top_p=0.9, seed=i)
              for i, k in enumerate(kinds)]
    indices = [7 * i for i in range(len(kinds))]
    alone = [target_token(logits[j], params[j], indices[j]) for j in range(len(kinds))]
    assert target_tokens(logits, params, indices) == alone


def test_seeded_draw_depends_on_seed_and_position_only() -> None:
    logits = torch.zeros(1000)  # uniform: any token may come
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [target_token(logits, params, i) for i in range(20)]
    assert draws == [target_token(logits, params, i) for i in range(20)]  # reproducible
    assert len(set(draws)) > 10  # positions draw independently
    assert draws != [target_token(logits, SamplingParams(temperature=1.0, seed=43), i) for i in range(20)]
