"""benchmarks.draft_ceiling: hit rates and the scheduler's replay on made-up runs, the rate over PP from stage
timings, and the command on tiny-random."""

from __future__ import annotations

import json

import pytest

from benchmarks import draft_ceiling
from benchmarks.draft_ceiling import Run, Setting

PERIOD = [11, 12, 13, 14, 15, 16, 17]
# the output repeats the prompt's period: the lookup proposes the target's token from the first output on
REPEATING = Run("rep", PERIOD * 3, PERIOD * 4, [[t, 0, 0, 0] for t in PERIOD * 4])
# every output token new: the lookup (whose last token was never seen before) proposes nothing
FRESH_OUTPUT = list(range(100, 140))
FRESH = Run("fresh", [1, 2, 3], FRESH_OUTPUT, [[t, 0, 0, 0] for t in FRESH_OUTPUT])


# label: (stages, async scheduling)
PIPES = {"2 stages": (2, False), "3 stages": (3, False), "4 stages": (4, False), "2 stages, async": (2, True)}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(PIPES))
def test_a_draft_that_never_proposes_decodes_as_pp(case) -> None:
    stages, async_scheduling = PIPES[case]
    r = draft_ceiling.replay(FRESH, stages, Setting(2, 2, async_scheduling))
    assert r["tokens"] == len(FRESH_OUTPUT) - 1
    assert r["tokens"] / r["steps"] == pytest.approx(1 / (stages + async_scheduling))
    assert r["rows"] == r["tokens"]  # a root for each token after the first, nothing drafted


@pytest.mark.unit
@pytest.mark.parametrize("case", list(PIPES))
def test_a_draft_that_always_holds_accepts_about_a_token_a_step(case) -> None:
    stages, async_scheduling = PIPES[case]
    r = draft_ceiling.replay(REPEATING, stages, Setting(stages - 1, 1, async_scheduling))
    assert r["tokens"] == len(REPEATING.output) - 1
    # one level a step once the pipe is full: only the first refill's round trip is lost
    assert r["steps"] <= r["tokens"] + stages + async_scheduling


@pytest.mark.unit
def test_replays_sums_each_file_and_names_pp_s_rate() -> None:
    settings = {"r1": Setting(1, 1), "async": Setting(1, 1, True), "shared": Setting(1, 1, shared_tokens=1000)}
    out = draft_ceiling.replays([REPEATING, FRESH, FRESH], 2, settings)
    assert set(out) == {"rep", "fresh"}
    assert out["fresh"]["r1"]["tokens_per_step"] == pytest.approx(1 / 2)
    assert out["fresh"]["async"]["pp_tokens_per_step"] == pytest.approx(1 / 3)
    assert out["rep"]["r1"]["tokens_per_step"] > 0.8
    # the second FRESH is drafted from the first's text: it decodes faster than alone
    assert out["fresh"]["shared"]["tokens_per_step"] > 0.6


@pytest.mark.unit
def test_hit_rates_of_the_lookup_and_its_fallbacks() -> None:
    # FRESH twice: the lookup never proposes (its last token is always new to its own text); the second time, the
    # shared table knows every n-gram of the first run, and the recycled table the target's token after each token
    rates = draft_ceiling.hit_rates([REPEATING, FRESH, FRESH])
    assert rates["rep"]["lookup"] == {"positions": len(REPEATING.output), "none": 0.0, "top1": 1.0, "top2": 1.0}
    fresh = rates["fresh"]
    assert (fresh["lookup"]["none"], fresh["lookup"]["top1"]) == (1.0, 0.0)
    for fallback in ("lookup>shared", "lookup>recycled"):
        assert (fresh[fallback]["none"], fresh[fallback]["top1"], fresh[fallback]["top2"]) == (0.5, 0.5, 0.5)


BANDWIDTH = {"stages": [
    {"numerics": "fast", "rows": 1, "alone_s": [0.02, 0.01], "beside_s": [0.03, 0.02], "pp_token_s": 0.03},
    {"numerics": "fast", "rows": 2, "alone_s": [0.03, 0.02], "beside_s": [0.04, 0.03], "pp_token_s": 0.05}]}
# label: (tokens per step, rows per step, expected rate over pp: on the host, alone)
RATES = {"one row": (0.9, 1.0, (0.9, 1.35)), "two rows": (0.8, 2.0, (0.6, 0.8)),
         "between": (1.0, 1.5, (0.03 / 0.035, 0.03 / 0.025)), "beyond": (1.0, 3.0, (0.75, 1.0))}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(RATES))
def test_allowed_rate_over_pp_from_the_stage_timings(case) -> None:
    tokens, rows, (here, alone) = RATES[case]
    out = draft_ceiling.allowed(tokens, rows, BANDWIDTH)["fast"]
    assert (out["here"], out["device_per_stage"]) == pytest.approx((here, alone))


@pytest.mark.unit
def test_the_command_decodes_caches_and_replays(tiny_dir, tmp_path, capsys) -> None:
    runs, out = tmp_path / "runs.json", tmp_path / "out.json"
    args = ["--model", "tiny-random", "--prompt-files", "sum.jsonl,alpaca.jsonl", "--prompts", "2", "--tokens", "6",
            "--runs", str(runs), "--out", str(out)]
    assert draft_ceiling.main(args) == 0
    result = json.loads(out.read_text())
    assert (result["prompts"], set(result["hit_rates"]), set(result["replay"]["sum"])) == (
        4, {"sum", "alpaca"}, set(draft_ceiling.SETTINGS))
    decoded = draft_ceiling.load_runs(runs)
    assert [len(r.output) for r in decoded] == [6] * 4 and all(len(t) == draft_ceiling.TOP for r in decoded
                                                             for t in r.top)
    assert draft_ceiling.main(args) == 0  # from the cache: the same replay
    assert json.loads(out.read_text())["replay"] == result["replay"]
    assert "tok/step" in capsys.readouterr().out
