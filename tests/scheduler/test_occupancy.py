"""Occupancy: the stage x step grid the dashboard and the benchmarks draw."""

from __future__ import annotations

import pytest

from scheduler.occupancy import Occupancy
from shared.types.batch import PipelineEvent, Row
from shared.types.config import SamplingParams
from tests.helpers import generate, pipeline

ROOT = -1


def _row(node: int, parent: int = ROOT, committed: bool = False, rid: str = "r") -> Row:
    return Row(rid, node, parent, 10 + node, 100 + node, committed, True)


def _timeline() -> list[tuple[list[Row], list[PipelineEvent]]]:
    """The first steps of ../shared/docs/specpipe-timeline.md (N=4, W=2): x1=0, a=1, b=2, c=3, d=4, L3={5,6}."""
    return [
        ([_row(0, committed=True)], []),  # step 1: L0 {x1}
        ([_row(1, 0), _row(2, 0)], []),  # step 2: L1 {a, b}
        ([_row(3, 1), _row(4, 1)], []),  # step 3: L2 {c, d} (both below a)
        ([_row(5, 3), _row(6, 3)], [PipelineEvent("r", "commit", (1,)), PipelineEvent("r", "prune", (2,))]),
        ([_row(7, 5)], [PipelineEvent("r", "commit", (3,)), PipelineEvent("r", "prune", (4,))]),
        ([_row(8, 7)], [PipelineEvent("r", "prune", (5, 6, 7, 8))]),  # step 6: a miss prunes everything
        ([_row(9, committed=True)], []),  # step 7: refill from the bonus token
    ]


@pytest.mark.unit
def test_timeline_columns_show_fates_and_bubbles() -> None:
    occ = Occupancy(stages=4)
    final = [col for step, (sent, events) in enumerate(_timeline(), 1) for col in occ.record(step, sent, events)]
    assert [c["step"] for c in final] == [1, 2, 3, 4]  # column t is final after step t + N - 1
    by_step = {c["step"]: c["stages"] for c in final}
    assert by_step[1] == [[["r", 1, 0]], [], [], []]  # three bubbles while the pipe fills
    assert by_step[2] == [[["r", 1, 1]], [["r", 1, 0]], [], []]  # a accepted, b pruned
    assert by_step[4] == [[["r", 0, 2]], [["r", 1, 1]], [["r", 1, 1]], [["r", 1, 0]]]
    assert occ.totals.steps == 4 and occ.totals.busy == [4, 3, 2, 1]
    # step 5: b was pruned at step 4, so stage 3 computes only {a}; stage 2 computes {c, d} before
    # that step's verification prunes d; L3 {5, 6} and L4 {7} fall to the miss at step 6
    occ.record(8, [], [])
    assert occ.columns[-1] == {"step": 5, "stages": [[["r", 0, 1]], [["r", 0, 2]], [["r", 1, 1]], [["r", 1, 0]]]}


@pytest.mark.unit
def test_fates_are_forgotten_once_no_column_needs_them() -> None:
    occ = Occupancy(stages=4)
    for step, (sent, events) in enumerate(_timeline(), 1):
        occ.record(step, sent, events)
    for step in range(8, 20):
        occ.record(step, [], [])
    assert occ.fate == {} and len(occ.pending) == 3  # the last N - 1 columns wait for their fates


CASES = {"pp N4": ("pp", 4), "tree N4": ("tree", 4), "specpipe N4": ("specpipe", 4), "specpipe N2": ("specpipe", 2)}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(CASES))
def test_occupancy_agrees_with_the_executor_trace(tiny_dir, case) -> None:
    policy, stages = CASES[case]
    occ = Occupancy(stages, keep=10_000)
    pipe = pipeline(tiny_dir, policy, stages, str(tiny_dir), refill_depth=3)
    pipe.trace_enabled, pipe.occupancy = True, occ
    state = generate(pipe, [5, 17, 99, 3, 5, 17, 42], 16, SamplingParams())
    for _ in range(stages):  # drain: the last columns become final
        occ.record(pipe.scheduler.step + 1 + _, [], [])
    columns = {c["step"]: c["stages"] for c in occ.columns}
    for trace in pipe.trace:
        computed = [sum(u + w for _, u, w in cells) for cells in columns[trace.step]]
        assert computed == [len(rows) for rows in trace.stages]
    exits = [cells for step in sorted(columns) for cells in columns[step][-1:]]
    useful_exits = sum(u for cells in exits for _, u, _ in cells)
    prompt, tokens = 7, len(state.output)
    if policy == "pp":  # every prompt row and every token but the last crosses the pipe once, all useful
        assert useful_exits == prompt + tokens - 1 and occ.totals.wasted == 0
    else:  # an accepted node may be cut short by the request's end, so at most that many
        assert prompt < useful_exits <= prompt + tokens - 1 and state.stats.accepted > 0


@pytest.mark.unit
def test_flush_finalizes_every_pending_column_when_the_pipe_is_empty() -> None:
    occ = Occupancy(stages=4)
    for step, (sent, events) in enumerate(_timeline()[:3], 1):
        occ.record(step, sent, events)
    done = occ.flush()
    assert [c["step"] for c in done] == [1, 2, 3] and not occ.pending and not occ.fate
    assert done[2]["stages"][0] == [["r", 0, 2]]  # fates never decided count as wasted
