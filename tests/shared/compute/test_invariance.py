"""Row invariance: a node's numbers do not depend on its micro-batch neighbours.

This is what makes every speculative path bit-identical to plain decoding in
fp32, so it is checked on the machine at hand rather than assumed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.compute.model import linear, rowwise_linear
from shared.compute.runner import RequestInfo, StageRunner
from shared.compute.weights import load_stage_weights
from shared.types.batch import MicroBatch, Row
from shared.types.config import ModelArch, SamplingParams
from tests.shared.compute.trees import prefill, random_tree, tree_rows

pytestmark = pytest.mark.unit


# label: (rows, in features, out features); every row of a product must equal the same row computed alone
SHAPES = {
    "one row": (1, 64, 128),
    "two rows": (2, 64, 128),
    "three rows": (3, 576, 1536),
    "nine rows": (9, 576, 576),
    "seventeen rows": (17, 1536, 512),
    "sixty-four rows, wide": (64, 128, 6144),
    "seventy rows, a remainder tile": (70, 576, 960),
}
PRODUCTS = {"rowwise (generated rows)": rowwise_linear, "64-row tiles (prompt rows)": linear}


@pytest.mark.parametrize("product", list(PRODUCTS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemm_row_matches_single_row(product: str, shape: str) -> None:
    rows, k, n = SHAPES[shape]
    gemm = PRODUCTS[product]
    gen = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), torch.randn(rows, k, generator=gen)
    batched = gemm(x, w, b)
    for i in range(rows):
        assert torch.equal(batched[i], gemm(x[i : i + 1], w, b)[0]), f"row {i} of {rows}"


# label: prefill chunk sizes; the prompt's hidden states must not depend on how it was chunked
CHUNKINGS = {"one chunk": [150], "64-row chunks": [64, 64, 22], "odd chunks": [5, 70, 1, 74], "row by row": [1] * 150}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_prompt_rows_do_not_depend_on_chunking(tiny_dir, chunking: str) -> None:
    prompt = torch.randint(3, 400, (150,), generator=torch.Generator().manual_seed(7)).tolist()
    states = {}
    for label, sizes in (("one chunk", [150]), (chunking, CHUNKINGS[chunking])):
        runner = _runner(tiny_dir)
        runner.add_request("r", RequestInfo(len(prompt), SamplingParams()), 256)
        rows = [Row("r", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(prompt)]
        out, start = [], 0
        for size in sizes:
            out.append(runner.hidden(MicroBatch(start, rows[start : start + size])))
            start += size
        states[label] = torch.cat(out)
    assert torch.equal(states["one chunk"], states[chunking])


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
