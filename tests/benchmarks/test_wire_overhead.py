"""benchmarks.wire_overhead's split of a pipeline step: made-up intervals, checked against the split by hand."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.wire_overhead import StepTimes, overhead, stage_compute

pytestmark = pytest.mark.unit


def step(n, start, wait, published, verified, end, compute):
    return StepTimes(n, 4, start, wait[0], wait[1], published, verified, end, tuple(compute))


# Each case: steps, then the expected seconds of (compute, scheduler, draft wait, wire) over all of them.
CASES = {
    # 1 s step: 0.1 s scheduling, 0.8 s stage compute between publish and verify, 0.1 s after it
    "no draft, one stage busy": (
        [step(1, 0.0, (0.1, 0.1), 0.1, 0.95, 1.0, [(0.12, 0.92)])],
        (0.8, 0.15, 0.0, 0.05),
    ),
    # the first stage is still computing step 1 during step 2's draft wait: that is compute, not waiting, and
    # the old split (wall - slowest stage - scheduler incl. the wait) went negative here
    "a stage computes into the next draft wait": (
        [step(1, 0.0, (0.0, 0.0), 0.0, 0.3, 0.3, [(0.0, 0.8), (0.05, 0.25)]),
         step(2, 0.3, (0.3, 1.0), 1.0, 1.5, 1.5, [(1.0, 1.4), (1.0, 1.45)])],
        (0.8 + 0.45, 0.0, 0.2, 0.05),
    ),
    "the draft is the slowest": (
        [step(1, 0.0, (0.0, 0.5), 0.5, 0.9, 1.0, [(0.55, 0.85)])],
        (0.3, 0.1, 0.5, 0.1),
    ),
    "stages busy together": (
        [step(1, 0.0, (0.0, 0.0), 0.0, 1.0, 1.0, [(0.1, 0.5), (0.3, 0.9)])],
        (0.8, 0.0, 0.0, 0.2),
    ),
}


@pytest.mark.parametrize("steps, expected", CASES.values(), ids=CASES.keys())
def test_the_parts_add_up_and_match_by_hand(steps, expected):
    o = overhead(steps)
    n = len(steps)
    got = tuple(o[k] * n / 1000 for k in ("mean_compute_ms", "mean_scheduler_ms", "mean_draft_wait_ms"))
    assert got == pytest.approx(expected[:3], abs=1e-9)
    wire = o["wire_share"] * o["mean_step_ms"] * n / 1000
    assert wire == pytest.approx(expected[3], abs=1e-9)
    shares = [o[k] for k in ("compute_share", "scheduler_share", "draft_wait_share", "wire_share")]
    assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0


def test_no_steps():
    assert overhead([]) == {"steps": 0}


def test_a_stage_s_median_forward_is_not_moved_by_a_long_prompt_step():
    """stage_compute: the mean counts a prompt's long forward, the median (a decode step's) does not; an empty
    forward (under 1 ms) is no forward."""
    forwards = [0.9, 0.01, 0.012, 0.011]  # seconds: a prompt, then three decode steps
    steps = [step(i, 0.0, (0.0, 0.0), 0.0, 1.0, 1.0, [(0.0, t), (0.0, 0.0005)]) for i, t in enumerate(forwards)]
    assert stage_compute(steps, 2) == pytest.approx([1000 * (0.9 + 0.01 + 0.012 + 0.011) / 4, None])
    assert stage_compute(steps, 2, statistics.median) == pytest.approx([11.5, None])
