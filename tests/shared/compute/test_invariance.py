"""Row invariance: a node's numbers do not depend on its micro-batch neighbours.

This is what makes every speculative path bit-identical to plain decoding in
fp32, so it is checked on the machine at hand rather than assumed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.compute.model import linear
from shared.compute.runner import StageRunner
from shared.compute.weights import load_stage_weights
from shared.types.batch import MicroBatch, Row
from shared.types.config import ModelArch
from tests.shared.compute.trees import prefill, random_tree, tree_rows

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "rows,k,n",
    [(1, 64, 128), (2, 64, 128), (3, 576, 1536), (9, 576, 576), (11, 64, 64), (17, 1536, 512), (64, 128, 6144)],
    ids=["one-row", "two-rows", "three-rows", "nine-rows-remainder-tile", "eleven-rows", "seventeen-rows", "sixty-four-rows-wide"],
)
def test_linear_row_matches_single_row(rows: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
    batched = linear(x, w)
    for i in range(rows):
        assert torch.equal(batched[i], linear(x[i : i + 1], w)[0])


def _runner(model_dir, start=0, end=None) -> StageRunner:
    arch = ModelArch.from_model_dir(model_dir)
    return StageRunner(arch, load_stage_weights(model_dir, arch, start, end or arch.num_layers))


@settings(max_examples=15, deadline=None)
@given(
    prompt=st.lists(st.integers(3, 400), min_size=1, max_size=12),
    parents=st.lists(st.integers(0, 10), min_size=1, max_size=10),
    seed=st.integers(0, 1000),
)
def test_tree_rows_equal_plain_path(tiny_dir, prompt, parents, seed) -> None:
    """A random tree in one micro-batch: each node's output equals decoding its path alone."""
    runner = _runner(tiny_dir)
    par, depth, tokens = random_tree(parents, seed)
    prefill(runner, "tree", prompt)
    tree_out = runner.hidden(MicroBatch(1, tree_rows("tree", len(prompt), par, depth, tokens)))
    for i in range(len(par)):
        path, node = [], i
        while node != -1:
            path.append(tokens[node])
            node = par[node]
        plain = _runner(tiny_dir)
        prefill(plain, "plain", prompt + path[::-1][:-1], prompt_len=len(prompt))  # ancestors: output, not prompt
        last = Row("plain", 0, -1, len(prompt) + depth[i], tokens[i], True, True)
        assert torch.equal(plain.hidden(MicroBatch(2, [last]))[0], tree_out[i]), f"node {i} differs"
