"""A small smoke of `specpipe bench`: cost measurement, the modeled sections, the report and its plots.

Benchmarks are not timed tests: this checks that the harness runs end to end on
tiny models and writes a complete report, never how fast anything is.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks import attention, report
from benchmarks.costmodel import CostModel, MeasureConfig
from shared.types.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": i, "turns": [t]}) for i, t in
                              enumerate(["Repeat: a b c a b c a b c", "Count: 1 2 3 1 2 3 1 2 3"])) + "\n")
    return path


def test_report_runs_end_to_end_on_tiny_models(tiny_dir, prompts, tmp_path) -> None:
    cfg = replace(report.quick_config(tmp_path), model=str(tiny_dir), draft=str(tiny_dir), workloads=(prompts,),
                  stages=(2,), max_new_tokens=8, measure=MeasureConfig(rows=(1, 8), context=(16, 64), repeats=1),
                  load_stages=2, load_requests=3, load_tokens=6, load_concurrency=(1, 2), load_rate_fractions=(0.5,),
                  sections=("tbt", "load"))
    path = report.run(cfg, log=lambda _: None)
    text = path.read_text()
    cost = CostModel.load(cfg.cost_models[0])  # measured here: target, draft and transfer tables
    assert cost.draft is not None and all(t > 0 for t in cost.target.layer.seconds[0])
    assert cost.provenance["device"] == "cpu"
    for part in ("## 1. One request", "## 3. Many requests", "(paper, SpecPipe-DB over vLLM: 1.64×–2.08×)"):
        assert part in text
    assert "**NO**" not in text  # every identity check passed
    for png in ("tbt.png", "occupancy.png", "throughput.png"):
        assert (tmp_path / png).stat().st_size > 5_000  # OUT is not the repository: the results lie in OUT
        assert f"]({png})" in text  # linked from BENCHMARKS.md beside them
    results = json.loads((tmp_path / "results.json").read_text())
    assert {s["workload"] for b in results["tbt"]["summaries"] for s in b["summary"]} == {"tiny"}


def test_a_bad_argument_deletes_no_cached_run(tmp_path) -> None:
    cached = tmp_path / "runs" / "tbt-pp-N2-greedy-0123456789.json"
    cached.parent.mkdir()
    cached.write_text("[]")
    with pytest.raises(ConfigError, match="prompt file not found"):
        report.main(["--out", str(tmp_path), "--prompts", str(tmp_path / "missing.jsonl")])
    assert cached.exists()


def test_resume_finds_the_committed_runs() -> None:
    """The repository's report keeps its runs under benchmarks/results/runs; docs/measurements.md renders the
    bf16-draft runs with `--out benchmarks/results/bf16-draft`, whose runs lie in its runs/."""
    full = report.full_config(report.ROOT)
    assert full.runs == report.RESULTS / "runs" and full.link("tbt.png") == "benchmarks/results/tbt.png"
    for kind in ("tbt-*.json", "load-*.json", "section-serving.json", "section-attention.json"):
        assert list(full.runs.glob(kind)), kind
    bf16 = report.full_config(report.RESULTS / "bf16-draft")
    assert bf16.runs == report.RESULTS / "bf16-draft" / "runs" and bf16.link("tbt.png") == "tbt.png"
    assert list(bf16.runs.glob("tbt-specpipe-N8-greedy-*.json"))


def test_attention_benchmark_measures_both_kernels() -> None:
    [row64, row128] = attention.attention_only([1024], block_rows=128, reps=1)
    assert {row64["d"], row128["d"]} == {64, 128}
    assert set(row64["ms"]) == {"sdpa", "runner_exact", "distr_g1", "distr_g2", "distr_g4"}
    assert row64["rel_err"]["distr_g1"] < 1e-5 < row64["rel_err"]["distr_g2"]


def test_a_subset_head_is_retimed_against_the_same_tables(tiny_dir, tmp_path) -> None:
    """`specpipe bench costs --draft-vocab N --from FILE` keeps FILE's target, draft layers and transfer and re-times
    only the draft's head, over the tokens a subset head scores, so that a sweep compares heads and nothing else."""
    base = tmp_path / "base.json"
    report.measure_costs(str(tiny_dir), str(tiny_dir), MeasureConfig(rows=(1, 8), context=(16,), repeats=1)).save(base)
    out = tmp_path / "subset.json"
    assert report.costs_main(["--model", str(tiny_dir), "--draft", str(tiny_dir), "--draft-vocab", "1000",
                              "--from", str(base), "--out", str(out)]) == 0
    before, after = CostModel.load(base), CostModel.load(out)
    assert (after.target, after.draft.layer, after.transfer) == (before.target, before.draft.layer, before.transfer)
    assert after.draft.head.rows == before.draft.head.rows and all(t > 0 for t in after.draft.head.seconds)
    assert after.provenance["draft_vocab"] == 1000 and before.provenance["draft_vocab"] == 0
    assert "head re-timed over 1000 tokens" in after.provenance["method"]
