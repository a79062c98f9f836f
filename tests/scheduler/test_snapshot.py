"""stats_message: the scheduler's counts as the gateway's metrics and dashboard read them."""

from __future__ import annotations

import pytest

from scheduler.mode_check import Mode
from scheduler.occupancy import Occupancy
from scheduler.snapshot import stats_message
from shared.types.config import SamplingParams
from shared.wire.messages import SchedulerStatsMsg, decode
from tests.helpers import generate, pipeline


@pytest.mark.unit
def test_snapshot_counts_match_the_requests_and_survive_the_wire(tiny_dir) -> None:
    pipe = pipeline(tiny_dir, "specpipe", 4, str(tiny_dir), refill_depth=3)
    pipe.occupancy = Occupancy(4)
    states = [generate(pipe, [5, 17, 99, 3, 5, 17, 42], n, SamplingParams(), rid=f"r{n}") for n in (12, 9)]
    msg = stats_message(pipe.scheduler, {"queued": 10.0}, pipe.occupancy, now=12.5, wall_time=1e9)
    assert decode(msg.encode(), SchedulerStatsMsg) == msg
    assert msg.tokens == sum(len(s.output) for s in states) == 21
    assert msg.accepted == sum(s.stats.accepted for s in states) == sum(msg.accepted_per_depth)
    assert msg.draft_tokens == sum(s.stats.sent_speculative for s in states) >= msg.accepted
    assert msg.waiting == [["queued", 2.5]] and msg.num_waiting == 1 and msg.num_running == 0
    assert msg.steps == pipe.scheduler.step and len(msg.stage_busy) == 4
    assert 0 < msg.stage_busy[3] <= msg.stage_busy[0] <= 1


@pytest.mark.unit
@pytest.mark.parametrize("mode", list(Mode))
def test_snapshot_says_which_mode_is_in_force_and_why(tiny_dir, mode) -> None:
    pipe = pipeline(tiny_dir, "specpipe", 2, str(tiny_dir))
    pipe.scheduler._mode_since = (mode, 0)
    pipe.scheduler.mode_check.observe(Mode.SPEC, 3, 10, 6, 0.5)  # 12 tokens/s at 3 decoding requests (bucket 4)
    pipe.scheduler.mode_check.observe(Mode.PLAIN, 1, 11, 1, 0.125)
    msg = stats_message(pipe.scheduler, {}, Occupancy(2), now=0.0, wall_time=1e9)
    assert decode(msg.encode(), SchedulerStatsMsg) == msg
    assert msg.speculating is (mode is Mode.SPEC)
    assert msg.mode_rates == {"plain@1": 8.0, "spec@4": 12.0}
