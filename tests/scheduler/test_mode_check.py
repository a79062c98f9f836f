"""The mode check (scheduler/mode_check.py): speculation against plain decoding, measured, at each load."""

from __future__ import annotations

import pytest

from scheduler.mode_check import FRESH, LATER, MIN_STEPS, PROBE_LIMIT, Mode, ModeCheck

pytestmark = pytest.mark.unit

SPEC, PLAIN = Mode.SPEC, Mode.PLAIN


def _measured(check: ModeCheck, mode: Mode, rate: float, until: int, decoding: int = 1) -> None:
    """MIN_STEPS steps of `mode` at `rate` tokens per second (1 s each), the last at step `until`."""
    steps = MIN_STEPS[mode]
    for step in range(until - steps + 1, until + 1):
        check.observe(mode, decoding, step, round(rate * 1000), 1000.0)


# label: (measurements (mode, tokens per second, last step measured), step asked, mode in force, expected)
CHOICES = {
    "nothing measured: the plan's speculation first": ([], 100, SPEC, SPEC),
    "speculation measured, plain decoding not: a probe of it": ([(SPEC, 0.5, 100)], 101, SPEC, PLAIN),
    "plain decoding measured faster": ([(SPEC, 0.4, 100), (PLAIN, 0.5, 120)], 121, PLAIN, PLAIN),
    "speculation measured faster": ([(SPEC, 0.7, 100), (PLAIN, 0.5, 120)], 121, PLAIN, SPEC),
    "within MARGIN, speculating: it stays": ([(SPEC, 0.49, 100), (PLAIN, 0.5, 120)], 121, SPEC, SPEC),
    "within MARGIN, decoding plainly: it stays": ([(SPEC, 0.51, 100), (PLAIN, 0.5, 120)], 121, PLAIN, PLAIN),
    "speculation within MARGIN last time, not measured for FRESH steps: measured again": (
        [(SPEC, 0.48, 100), (PLAIN, 0.5, 120)], 100 + FRESH, PLAIN, SPEC),
    "speculation slower last time: measured again LATER times less often": (
        [(SPEC, 0.3, 100), (PLAIN, 0.5, 120)], 100 + FRESH, PLAIN, PLAIN),
    "... and then measured again": ([(SPEC, 0.3, 100), (PLAIN, 0.5, 120)], 100 + LATER * FRESH, PLAIN, SPEC),
    "plain decoding slower last time: not probed again at FRESH": (
        [(PLAIN, 0.3, 100), (SPEC, 0.9, 120)], 100 + FRESH, SPEC, SPEC),
}


@pytest.mark.parametrize("case", list(CHOICES))
def test_the_check_chooses(case) -> None:
    measured, step, current, expected = CHOICES[case]
    check = ModeCheck()
    for mode, rate, until in measured:
        _measured(check, mode, rate, until)
    assert check.choose(1, step, current) is expected


def test_modes_are_compared_at_the_load_they_were_measured_at() -> None:
    check = ModeCheck()
    _measured(check, SPEC, 0.2, 100, decoding=16)
    _measured(check, PLAIN, 0.9, 110, decoding=16)
    assert check.choose(16, 111, SPEC) is PLAIN
    assert check.choose(12, 111, SPEC) is PLAIN  # 9-16 requests: one load
    assert check.choose(1, 111, PLAIN) is SPEC  # one request: nothing measured yet


def test_a_probe_that_measures_nothing_gives_way_until_the_next_is_due() -> None:
    """Prompt rows in every step (a busy server): plain decoding is never measured, so its probe ends after
    PROBE_LIMIT steps and the plan speculates until FRESH steps after the probe began."""
    check = ModeCheck()
    _measured(check, SPEC, 0.5, 100)
    assert check.choose(1, 101, SPEC) is PLAIN
    assert check.choose(1, 101 + PROBE_LIMIT - 1, PLAIN) is PLAIN
    assert check.choose(1, 101 + PROBE_LIMIT, PLAIN) is SPEC
    _measured(check, SPEC, 0.5, 100 + FRESH)  # still measured, so known
    assert check.choose(1, 101 + FRESH, SPEC) is PLAIN  # the next probe


def test_a_stale_rate_starts_again() -> None:
    check = ModeCheck()
    _measured(check, PLAIN, 0.1, 100)
    _measured(check, PLAIN, 0.5, 100 + FRESH + MIN_STEPS[PLAIN])
    assert check.snapshot() == {"plain@1": pytest.approx(0.5)}
