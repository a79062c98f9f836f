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


# label: (measurements (mode, tokens per second, last step measured), step asked, expected)
CHOICES = {
    "nothing measured: the plan's speculation first": ([], 100, SPEC),
    "speculation measured, plain decoding not: a probe of it": ([(SPEC, 0.5, 100)], 101, PLAIN),
    "plain decoding measured faster": ([(SPEC, 0.4, 100), (PLAIN, 0.5, 120)], 121, PLAIN),
    "plain decoding faster by just over MARGIN": ([(SPEC, 0.47, 100), (PLAIN, 0.5, 120)], 121, PLAIN),
    "speculation measured faster": ([(SPEC, 0.7, 100), (PLAIN, 0.5, 120)], 121, SPEC),
    "plain decoding faster within MARGIN: the plan's speculation (a probe ends)": (
        [(SPEC, 0.48, 100), (PLAIN, 0.5, 120)], 121, SPEC),
    "speculation faster within MARGIN": ([(SPEC, 0.51, 100), (PLAIN, 0.5, 120)], 121, SPEC),
    "plain decoding faster, speculation not measured for FRESH steps: measured again": (
        [(SPEC, 0.48, 100), (PLAIN, 0.5, 120)], 100 + FRESH, SPEC),
    "speculation slower last time: measured again LATER times less often": (
        [(SPEC, 0.3, 100), (PLAIN, 0.5, 120)], 100 + FRESH, PLAIN),
    "... and then measured again": ([(SPEC, 0.3, 100), (PLAIN, 0.5, 120)], 100 + LATER * FRESH, SPEC),
    "plain decoding slower last time: not probed again at FRESH": (
        [(PLAIN, 0.3, 100), (SPEC, 0.9, 120)], 100 + FRESH, SPEC),
}


@pytest.mark.parametrize("case", list(CHOICES))
def test_the_check_chooses(case) -> None:
    measured, step, expected = CHOICES[case]
    check = ModeCheck()
    for mode, rate, until in measured:
        _measured(check, mode, rate, until)
    assert check.choose(1, step) is expected


def test_modes_are_compared_at_the_load_they_were_measured_at() -> None:
    check = ModeCheck()
    _measured(check, SPEC, 0.2, 100, decoding=16)
    _measured(check, PLAIN, 0.9, 110, decoding=16)
    assert check.choose(16, 111) is PLAIN
    assert check.choose(12, 111) is PLAIN  # 9-16 requests: one load
    assert check.choose(1, 111) is SPEC  # one request: nothing measured yet


def test_a_probe_that_measures_nothing_gives_way_until_the_next_is_due() -> None:
    """Prompt rows in every step (a busy server): plain decoding is never measured, so its probe ends after
    PROBE_LIMIT steps and the plan speculates until FRESH steps after the probe began."""
    check = ModeCheck()
    _measured(check, SPEC, 0.5, 100)
    assert check.choose(1, 101) is PLAIN
    assert check.choose(1, 101 + PROBE_LIMIT - 1) is PLAIN
    assert check.choose(1, 101 + PROBE_LIMIT) is SPEC
    _measured(check, SPEC, 0.5, 100 + FRESH)  # still measured, so known
    assert check.choose(1, 101 + FRESH) is PLAIN  # the next probe


def test_a_stale_rate_starts_again() -> None:
    check = ModeCheck()
    _measured(check, PLAIN, 0.1, 100)
    _measured(check, PLAIN, 0.5, 100 + FRESH + MIN_STEPS[PLAIN])
    assert check.snapshot() == {"plain@1": pytest.approx(0.5)}


def test_a_new_lone_request_is_measured_afresh() -> None:
    """At one request, speculation's rate is that request's: the next lone request is not judged by it (plain
    decoding's rate is kept); at higher loads, where a rate pools many requests, nothing is forgotten."""
    check = ModeCheck()
    for decoding in (1, 4):
        _measured(check, SPEC, 0.4, 100, decoding)
        _measured(check, PLAIN, 0.5, 120, decoding)
    assert check.choose(1, 121) is PLAIN and check.choose(4, 121) is PLAIN
    check.new_lone_request()
    assert check.choose(1, 121) is SPEC  # this request's speculation is measured first
    assert check.choose(4, 121) is PLAIN
    _measured(check, SPEC, 0.6, 200)
    assert check.choose(1, 201) is SPEC  # ... against plain decoding's rate, kept
    assert check.snapshot()["plain@1"] == pytest.approx(0.5)
