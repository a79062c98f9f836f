"""Smoke of benchmarks/serving.py on tiny-random: the real services (2 stage processes), transformers, the
in-process executor; checks the results' structure and their identity checks, not timings (> 0 only)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import interleaved
from benchmarks.serving import ServingConfig, compare, run_all, single_request, update_single_request
from benchmarks.serving_report import markdown, section_2

pytestmark = pytest.mark.multiproc

MAX_NEW = 8


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_dir) -> ServingConfig:
    return ServingConfig(model="tiny-random", draft="ngram", prompt_files=("mt_bench.jsonl", "alpaca.jsonl"),
                         prompts_per_file=1, max_new_tokens=MAX_NEW, load_prompts=2, load_max_new_tokens=MAX_NEW,
                         concurrencies=(1, 2), requests_per_point=2, rates=(4.0,), poisson_requests=3, hf_threads=1,
                         request_timeout_s=120, start_timeout_s=120, log_dir=str(tmp_path_factory.mktemp("logs")))


@pytest.fixture(scope="module")
def results(cfg) -> dict:
    return run_all(cfg, progress=False)


def test_no_section_failed(results) -> None:
    for name in ("single_request", "hf_baseline", "load", "resources"):
        assert results[name]["error"] is None, (name, results[name]["error"])


def test_single_request_pp_and_specpipe_identical(results) -> None:
    s = results["single_request"]
    assert set(s["policies"]) == {"pp", "specpipe"} and s["identical"] and not s["mismatches"]
    for policy, v in s["policies"].items():
        assert v["requests"] == 2 and v["failed"] == 0
        for r in v["requests_detail"]:
            assert 1 <= r["tokens"] <= MAX_NEW and r["finish_reason"] in ("stop", "length") and r["error"] is None
        assert v["tokens"] == sum(len(r["output_ids"]) for r in v["requests_detail"])
        assert v["ttft_s"]["mean"] > 0 and v["tbt_s"]["mean"] > 0 and v["tokens_per_s"] > 0
        assert v["steps"] > 0 and v["cluster"]["wire"]["steps"] > 0
    assert s["policies"]["pp"]["decode_tokens_per_step"] == pytest.approx(1 / 2)  # pp: one token per N steps


def test_hf_baseline_runs_agree_with_generate(results) -> None:
    h = results["hf_baseline"]
    assert set(h["runs"]) == {"hf_generate", "hf_assisted", "inprocess_specpipe_N2_fast", "services_pp",
                              "services_specpipe"}  # the in-process run in the default numerics, fast
    assert h["identical"] and not h["mismatches"] and h["assistant_is_target"]
    reference = h["runs"]["hf_generate"]["outputs"]
    for run in h["runs"].values():
        assert run["outputs"] == reference and run["tokens"] == sum(map(len, reference))
        assert run["tokens_per_s"] > 0
    assert reference == [r["output_ids"] for r in results["single_request"]["policies"]["pp"]["requests_detail"]]


def test_load_points_and_lossless_check(results) -> None:
    d = results["load"]
    sweep = (("concurrency", 1), ("concurrency", 2), ("poisson", 4.0))
    assert [(p["policy"], p["mode"], p["value"]) for p in d["points"]] == [
        (policy, mode, value) for policy in ("pp", "specpipe") for mode, value in sweep]
    for p in d["points"]:
        assert p["failed"] == 0 and p["requests"] == (3 if p["mode"] == "poisson" else 2)
        assert p["tokens"] > 0 and p["tokens_per_s"] > 0 and p["tokens_per_step"] > 0
        assert p["ttft_s"]["n"] == p["requests"] and p["tbt_s"]["mean"] > 0
    assert d["lossless"]["identical"] and d["lossless"]["checked"] == sum(p["requests"] for p in d["points"])


def test_resources_rows(results) -> None:
    rows = results["resources"]["rows"]
    assert {r["run"].split(" (")[0] for r in rows} == {"single request, pp", "single request, specpipe",
                                                       "load sweep, pp", "load sweep, specpipe"}
    for r in rows:
        assert sum(r["stage_weight_bytes"]) >= r["model_bytes"] > 0
        for k, weights in enumerate(r["stage_weight_bytes"]):
            assert r["peak_rss_bytes"][f"stage-{k}"] > weights > 0
    # the n-gram draft is looked up in the scheduler (specpipe up's default): no draft worker in either run
    assert all(set(r["peak_rss_bytes"]) == {"scheduler", "stage-0", "stage-1"} for r in rows[:2]), rows


def test_markdown_has_every_section(results) -> None:
    text = markdown(results)
    for title in ("### 1.", "### 2.", "### 3.", "### 4.", "Redis queue", "identical, token for token: **yes**"):
        assert title in text
    assert "NOT identical" not in text and "FAILED" not in text and "ERROR" not in text


def test_a_differing_output_is_reported(results) -> None:
    h = results["hf_baseline"]
    prompts = [{"file": p["file"], "id": p["id"]} for p in h["prompts"]]
    reference = h["runs"]["hf_generate"]["outputs"]
    doctored = [list(o) for o in reference]
    doctored[1][2] += 1
    verdict = compare(reference, {"services_specpipe": doctored}, prompts)
    assert not verdict["identical"]
    assert verdict["mismatches"] == [{"run": "services_specpipe", "prompt": f"{prompts[1]['file']}#{prompts[1]['id']}",
                                      "first_diff": 2, "tokens": [len(reference[1])] * 2}]
    text = section_2({**h, **verdict})
    assert "**Outputs NOT identical**" in text and "differs from token 2" in text and "**NO**" in text


def test_a_dead_process_ends_the_section_with_an_error(cfg) -> None:
    broken = dataclasses.replace(cfg, width=0)  # the scheduler refuses width 0 and exits at start-up
    result = single_request(broken)
    assert result["error"] and "scheduler exited" in result["error"] and "width" in result["error"]
    assert result["identical"] is False


def test_clusters_stopped_and_keys_deleted(results) -> None:
    import redis

    r = redis.Redis.from_url(results["config"]["redis_url"])
    prefixes = {row["prefix"] for row in [*(v["cluster"] for v in results["single_request"]["policies"].values()),
                                          *results["load"]["clusters"].values()]}
    assert len(prefixes) == 2  # sections 1 and 3 shared the pp and the specpipe cluster
    assert not [k for p in prefixes for k in r.scan_iter(f"{p}:*")]


def test_update_re_measures_section_1_and_recomputes_what_depends_on_it(cfg, results) -> None:
    import copy

    old = copy.deepcopy(results)
    updated = update_single_request(cfg, old)
    assert updated["single_request"]["measured_at"] and updated["single_request"]["identical"]
    assert updated["single_request"] is not old["single_request"]
    h = updated["hf_baseline"]
    assert h["runs"]["hf_generate"] == results["hf_baseline"]["runs"]["hf_generate"]  # kept, not re-run
    assert h["runs"]["services_specpipe"]["outputs"] == [
        r["output_ids"] for r in updated["single_request"]["policies"]["specpipe"]["requests_detail"]]
    assert h["identical"] and updated["load"] == results["load"]
    assert "section 1 re-measured" in markdown(updated)


@pytest.mark.parametrize("arms", [("pp", "specpipe"), ("specpipe", "specpipe-async")], ids=" vs ".join)
def test_interleaved_turns_serve_both_arms_alike(cfg, arms) -> None:
    """benchmarks.interleaved: two clusters up side by side, each prompt to one then the other, twice; the same
    tokens from both, every request timed."""
    out = interleaved.run(cfg, rounds=2, arms=arms)
    assert out["error"] is None and out["identical"]
    assert [len(out["tbt_s"][a]) for a in arms] == [2 * out["prompts"]] * 2
    assert out["decode_rate"] > 0
    for arm in arms:  # every process's CPU per step, each one's own
        cpu = out["cpu_ms_per_step"][arm]
        assert out["steps"][arm] > 0 and {"scheduler", "stage-0", "stage-1"} <= set(cpu)
        assert all(ms >= 0 for ms in cpu.values()) and cpu["stage-0"] > 0
