"""benchmarks.bandwidth: the host probe and the stages' decode steps alone and beside each other, on tiny-random."""

from __future__ import annotations

import pytest

from benchmarks import bandwidth

pytestmark = pytest.mark.multiproc


def test_probe_rates_each_kind_alone_and_on_both_cores() -> None:
    out = bandwidth.probe(repeats=1, seconds=0.2)
    assert set(out) == {"stream", "matmul"}
    for rates in out.values():
        assert rates["alone"] > 0 and len(rates["beside"]) == 2 and all(r > 0 for r in rates["beside"])
        assert rates["beside"][0] <= rates["beside"][1]  # the slower core first
        assert rates["slowdown"] == pytest.approx(rates["alone"] / (sum(rates["beside"]) / 2))


# label: (numerics, rows per decode step, tries of alone and beside in turn)
CASES = {"fast, one row": ("fast", 1, 1), "fast, two rows": ("fast", 2, 1), "exact, one row": ("exact", 1, 1),
         "fast, one row, two tries": ("fast", 1, 2)}


@pytest.mark.parametrize("case", list(CASES))
def test_stages_time_each_stage_alone_and_beside(tiny_dir, case) -> None:
    numerics, rows, repeats = CASES[case]
    s = bandwidth.stages("tiny-random", numerics, rows, steps=3, context=8, repeats=repeats)
    assert (s["numerics"], s["rows"]) == (numerics, rows)
    assert len(s["alone_s"]) == len(s["beside_s"]) == bandwidth.STAGES
    assert all(t > 0 for t in s["alone_s"] + s["beside_s"])
    assert s["pp_token_s"] == pytest.approx(sum(s["alone_s"]))
    assert s["specpipe_step_s"] == max(s["beside_s"])


def test_needs_sets_specpipe_s_steps_against_pp_s_one_row_token() -> None:
    timings = [{"rows": 2, "alone_s": [0.03, 0.02], "specpipe_step_s": 0.04, "pp_token_s": 0.05},
               {"rows": 1, "alone_s": [0.02, 0.01], "specpipe_step_s": 0.03, "pp_token_s": 0.03}]
    bandwidth.needs(timings)
    assert [s["pp_one_row_token_s"] for s in timings] == [0.03, 0.03]  # PP sends one row, whatever SpecPipe sends
    assert [s["tokens_per_step_for_1x"] for s in timings] == pytest.approx([4 / 3, 1.0])
    assert [s["tokens_per_step_for_1x_device_per_stage"] for s in timings] == pytest.approx([1.0, 2 / 3])


def test_an_unknown_numerics_mode_is_refused() -> None:
    with pytest.raises(SystemExit):
        bandwidth.main(["--numerics", "fast,turbo"])


def test_a_stage_that_dies_is_an_error_not_a_wait() -> None:
    with pytest.raises(RuntimeError, match="died"):
        bandwidth.stages("no-such-model", "fast", 1, steps=3, context=8)
