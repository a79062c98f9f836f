"""The modeled draft device beside the pipe (specpipe/executor.py DraftLane): forwards one after another, and the
expansions asked while one waits to start drafted with it, as a draft worker drafts every job of one read in one
forward."""

from __future__ import annotations

import pytest

from specpipe.executor import DraftLane

pytestmark = pytest.mark.unit


def test_expansions_asked_before_the_queued_one_starts_join_it() -> None:
    told: list[tuple[int, float]] = []
    lane = DraftLane(lambda rows, context: 1.0 + 0.1 * rows, lambda nodes, s: told.append((nodes, s)))
    lane.run(10, 10, ["prompt"])  # a prompt: 0 .. 2
    lane.now = 0.5
    lane.run(2, 11, ["a"], nodes=2)  # queued: 2 .. 3.2
    lane.now = 1.0
    lane.run(3, 12, ["b"], nodes=3)  # not started yet: joins it, 5 rows, 2 .. 3.5
    assert lane.free_at == pytest.approx(3.5)
    lane.now = 2.5
    lane.run(1, 13, ["c"], nodes=1)  # the queued one has started: a forward of its own, 3.5 .. 4.6
    assert lane.free_at == pytest.approx(4.6) and lane.busy == pytest.approx(2.0 + 1.5 + 1.1)
    lane.now = 3.5
    assert lane.ready() == ["prompt", "a", "b"]
    assert told == [(5, pytest.approx(1.5))]  # an expansion's time, told as it ends; a prompt's never
    lane.now = 5.0
    assert lane.ready() == ["c"] and told[-1] == (1, pytest.approx(1.1))


def test_a_waiting_steps_drafting_takes_the_device_and_nothing_joins_what_came_before() -> None:
    lane = DraftLane(lambda rows, context: 1.0)
    lane.run(1, 5, ["a"], nodes=1)  # 0 .. 1
    lane.run(1, 5, ["b"], nodes=1)  # queued: 1 .. 2
    assert lane.occupy(0.5) == pytest.approx(2.5)  # the waiting step's drafting: 2 .. 2.5
    lane.run(1, 5, ["c"], nodes=1)  # after it, not joined to "b"
    assert lane.free_at == pytest.approx(3.5)
    lane.now = 2.0
    assert lane.ready() == ["a", "b"]


def test_a_level_goes_ahead_of_the_prompts_not_started_yet() -> None:
    """A draft worker serves a read's levels before its prompts: a level asked while prompts wait for the device
    runs once the forward under way ends, and they after it; a prompt started is not interrupted."""
    lane = DraftLane(lambda rows, context: rows / 10)
    lane.run(20, 20, ["p1"])  # 0 .. 2
    lane.run(30, 30, ["p2"])  # queued: 2 .. 5
    lane.now = 1.0
    lane.run(5, 21, ["a"], nodes=5)  # ahead of p2: 2 .. 2.5
    lane.run(5, 22, ["b"], nodes=5)  # joins "a", still ahead of p2: 2 .. 3
    assert [(f.proposals, f.start, f.end) for f in lane.pending] == [
        (["p1"], 0.0, 2.0), (["a", "b"], 2.0, 3.0), (["p2"], 3.0, 6.0)]
    assert lane.occupy(0.5) == pytest.approx(2.5)  # a waiting step's drafting, after the level, ahead of p2
    assert lane.free_at == pytest.approx(6.5) and lane.busy == pytest.approx(2 + 3 + 1)
    lane.now = 3.5
    assert lane.ready() == ["p1", "a", "b"]
