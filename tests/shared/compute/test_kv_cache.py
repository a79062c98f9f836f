"""KV compaction on prune/commit leaves exactly the logits of recomputing from scratch; the KV use a stage
reports."""

from __future__ import annotations

import pytest
import torch

from shared.compute.kv_cache import KVUse, allocate, kv_use
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


def _cache_with(capacity: int, placed: int):
    cache = allocate(1, capacity, 1, 2, torch.float32)
    for p in range(placed):
        cache.place(Row("r", -(p + 2), -(p + 1), p, 0, True, False))
    return cache


# label: ([(capacity, rows placed) per request], budget, expected KVUse, expected fraction)
KV_USE = {
    "empty": ([], 100, KVUse(0, 0, 0, 100), 0.0),
    "reserved, not filled": ([(40, 0)], 100, KVUse(1, 40, 0, 100), 0.4),
    "two requests": ([(40, 6), (20, 3)], 100, KVUse(2, 60, 9, 100), 0.6),
    "over the budget": ([(80, 1), (40, 1)], 100, KVUse(2, 120, 2, 100), 1.0),
    "budget unknown": ([(40, 6)], 0, KVUse(1, 40, 6, 0), 0.0),
}


@pytest.mark.parametrize("caches,budget,use,fraction", list(KV_USE.values()), ids=list(KV_USE))
def test_kv_use_counts_reserved_slots_against_the_budget(caches, budget, use, fraction) -> None:
    got = kv_use([_cache_with(c, n) for c, n in caches], budget)
    assert got == use and got.fraction == pytest.approx(fraction)


def test_a_runner_reports_the_kv_its_requests_hold(tiny_dir) -> None:
    runner = _runner(tiny_dir)  # "r": 64 slots, the prompt's 6 filled
    runner.add_request("s", RequestInfo(2, SamplingParams()), 32)
    assert runner.kv_use(1000) == KVUse(2, 96, 6, 1000)
    runner.apply([PipelineEvent("r", "finish", ())])
    assert runner.kv_use(1000) == KVUse(1, 32, 0, 1000)
