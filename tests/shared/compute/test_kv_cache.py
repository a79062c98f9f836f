"""KV compaction on prune/commit leaves exactly the logits of recomputing from scratch."""

from __future__ import annotations

import pytest
import torch

from shared.compute.runner import RequestInfo, StageRunner
from shared.compute.weights import load_stage_weights
from shared.types.batch import MicroBatch, PipelineEvent, Row
from shared.types.config import ModelArch, SamplingParams
from shared.types.errors import ProtocolError

pytestmark = pytest.mark.unit
PROMPT = [11, 42, 7, 300, 5, 9]


def _runner(model_dir) -> StageRunner:
    arch = ModelArch.from_model_dir(model_dir)
    runner = StageRunner(arch, load_stage_weights(model_dir, arch, 0, arch.num_layers))
    runner.add_request("r", RequestInfo(len(PROMPT), SamplingParams()), 64)
    runner.hidden(MicroBatch(0, [Row("r", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(PROMPT)]))
    return runner


def _logits(runner: StageRunner, rows: list[Row]) -> torch.Tensor:
    return runner.logits(runner.hidden(MicroBatch(9, rows)))


@pytest.mark.parametrize(
    "events,path",
    [
        ([("prune", (1, 3))], [0, 2]),  # sibling subtree pruned, compaction moves node 2 down
        ([("prune", (1, 3)), ("commit", (0,))], [0, 2]),  # then node 0 joins the prefix
        ([("prune", (0, 2)), ("commit", (1,)), ("commit", (3,))], [1, 3]),  # whole other branch accepted
        ([("prune", (2, 1, 3))], [0]),  # leaves and the other branch pruned, node 0 stays in flight
    ],
    ids=["prune-sibling", "prune-then-commit", "accept-second-branch", "prune-leaf"],
)
def test_compacted_cache_matches_recompute(tiny_dir, events, path) -> None:
    tokens = {0: 21, 1: 22, 2: 23, 3: 24}
    tree = [Row("r", 0, -1, 6, 21, False, True), Row("r", 1, -1, 6, 22, False, True),
            Row("r", 2, 0, 7, 23, False, True), Row("r", 3, 1, 7, 24, False, True)]
    runner = _runner(tiny_dir)
    _logits(runner, tree)
    runner.apply([PipelineEvent("r", kind, ids) for kind, ids in events])
    cache = runner.kv["r"]
    assert cache.used == len(PROMPT) + len(path)  # pruned slots are gone, not masked
    new = Row("r", 7, path[-1], len(PROMPT) + len(path), 99, False, True)
    compacted = _logits(runner, [new])

    fresh = _runner(tiny_dir)
    rows = [Row("r", 100 + i, -1, len(PROMPT) + i, tokens[n], True, False) for i, n in enumerate(path)]
    recomputed = _logits(fresh, rows + [Row("r", 7, -1, len(PROMPT) + len(path), 99, True, True)])[-1:]
    assert torch.equal(compacted, recomputed)


def test_committed_row_behind_speculation_is_rejected(tiny_dir) -> None:
    runner = _runner(tiny_dir)
    runner.hidden(MicroBatch(1, [Row("r", 0, -1, 6, 21, False, True)]))
    with pytest.raises(ProtocolError, match="committed row"):
        runner.hidden(MicroBatch(2, [Row("r", 5, -1, 7, 22, True, True)]))


def test_position_must_follow_ancestors(tiny_dir) -> None:
    runner = _runner(tiny_dir)
    with pytest.raises(ProtocolError, match="does not follow"):
        runner.hidden(MicroBatch(1, [Row("r", 0, -1, 9, 21, False, True)]))
