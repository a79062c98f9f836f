"""The benchmark harness's modeled time: cost tables, step durations, single-request TBT, load points."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.costmodel import CostModel, ModelCost, Table1D, Table2D
from benchmarks.load_model import LoadModelConfig, compare
from benchmarks.load_model import run_all as load_all
from benchmarks.tbt import TbtConfig, Workload, occupancy_columns, run_all, summarize, timed
from scheduler.scheduler import Scheduler
from shared.types.config import SamplingParams

LAYER_S, HEAD_S, XFER_S, DRAFT_LAYER_S = 0.010, 0.004, 0.001, 0.002
PROMPT = [5, 17, 99, 3, 5, 17, 42, 7]


def _flat(seconds: float, rows=(1, 64), context=(16, 4096)) -> Table2D:
    return Table2D(list(rows), list(context), [[seconds] * len(context) for _ in rows])


def _cost(draft: bool) -> CostModel:
    target = ModelCost("t", 8, _flat(LAYER_S), Table1D([1, 64], [HEAD_S, HEAD_S]))
    drafter = ModelCost("d", 8, _flat(DRAFT_LAYER_S), Table1D([1, 64], [0.0, 0.0])) if draft else None
    return CostModel(target, drafter, Table1D([1, 64], [XFER_S, XFER_S]), {"what": "test"})


INTERP = {"between": (2.5, 100, 2.5), "below": (0.5, 100, 0.5), "beyond": (5.0, 100, 5.0), "context": (2, 150, 2.5)}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(INTERP))
def test_tables_interpolate_between_measured_points(case) -> None:
    n, length, expected = INTERP[case]
    table = Table2D([1, 4], [100, 200], [[1.0, 2.0], [4.0, 5.0]])  # seconds = n + (L - 100) / 100
    assert table(n, length) == pytest.approx(expected)


@pytest.mark.unit
def test_cost_model_round_trips_through_json(tmp_path) -> None:
    cost = _cost(draft=True)
    cost.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json") == cost


@pytest.mark.unit
def test_sampled_runs_only_at_their_own_stage_counts(tiny_dir, tmp_path) -> None:
    samplings = {"greedy": SamplingParams(), "t1": SamplingParams(temperature=1.0, seed=0)}
    cfg = TbtConfig(str(tiny_dir), str(tiny_dir), (2, 4), samplings, 6, 3, 3, 3, tmp_path, sampled_stages=(4,))
    rows = run_all(cfg, [Workload("w", [("p", PROMPT)])], log=lambda _: None)
    assert {(r["sampling"], r["stages"]) for r in rows} == {("greedy", 2), ("greedy", 4), ("t1", 4)}
    assert all(s["identical"] for s in summarize(timed(rows, _cost(draft=True))))


@pytest.mark.unit
def test_modeled_tbt_of_pp_is_n_stage_steps_and_specpipe_is_faster(tiny_dir, tmp_path) -> None:
    stages = 4
    cfg = TbtConfig(str(tiny_dir), str(tiny_dir), (stages,), {"greedy": SamplingParams()}, 12, 3, 3, 3, tmp_path)
    rows = timed(run_all(cfg, [Workload("w", [("p", PROMPT)])], log=lambda _: None), _cost(draft=True))
    pp = next(r for r in rows if r["policy"] == "pp")
    per_step = 2 * LAYER_S + XFER_S  # 8 layers over 4 stages; the last stage adds the head
    assert pp["steps"] == (pp["tokens"] - 1) * stages
    assert pp["tbt_s"] == pytest.approx(stages * per_step + HEAD_S, rel=1e-9)
    [summary] = summarize(rows)
    assert summary["identical"] and summary["speedup_vs_pp"] > 1.5  # a perfect draft: hits every level
    assert len(list(tmp_path.glob(f"tbt-specpipe-N{stages}-greedy-*.json"))) == 1  # cached for a resumed run
    grids = occupancy_columns(cfg, PROMPT, stages, steps=12)
    busy = {p: sum(bool(cells) for c in g for cells in c["stages"]) for p, g in grids.items()}
    assert busy["pp"] <= 12 < busy["specpipe"]  # pp keeps one stage of four busy


@pytest.mark.unit
def test_load_points_are_lossless_and_batching_raises_throughput(tiny_dir, tmp_path) -> None:
    cfg = LoadModelConfig(str(tiny_dir), str(tiny_dir), 4, 3, 3, 10, 6, (1, 4), (0.5,), tmp_path)
    points = load_all(cfg, _cost(draft=True), [PROMPT, PROMPT[2:]], log=lambda _: None)
    rows = compare(points)
    assert len(rows) == 3 and all(r["identical"] for r in rows)
    by_c = {r["concurrency"]: r for r in rows if r["concurrency"]}
    assert by_c[4]["throughput"]["pp"] > by_c[1]["throughput"]["pp"]  # continuous batching fills the pipe
    assert by_c[1]["throughput_ratio"] > 1.5  # one request: speculation fills the idle stages
    assert all(p["tokens"] == 6 * 10 for p in points)


@pytest.mark.unit
def test_load_points_with_the_draft_beside_the_pipe_never_wait_for_it(tiny_dir, tmp_path) -> None:
    """A draft forward of about 4 pipeline steps (8 layers at 10 ms): waited for, it paces the speculating steps;
    beside the pipe (draft_waits=False) no step waits for it, it is busy part of the time, and the tokens are
    still plain decoding's."""
    slow = replace(_cost(draft=True), draft=ModelCost("d", 8, _flat(LAYER_S), Table1D([1, 64], [0.0, 0.0])))
    cfg = LoadModelConfig(str(tiny_dir), str(tiny_dir), 4, 3, 3, 10, 4, (2,), (), tmp_path, width_rule="budget")
    waited = load_all(cfg, slow, [PROMPT, PROMPT[2:]], log=lambda _: None)
    beside = load_all(replace(cfg, draft_waits=False), slow, [PROMPT, PROMPT[2:]], log=lambda _: None)
    assert all(r["identical"] for r in compare(waited) + compare(beside))
    [waited_sp] = [p for p in waited if p["policy"] == "specpipe"]
    [beside_sp] = [p for p in beside if p["policy"] == "specpipe"]
    assert waited_sp["draft_bound_steps"] > 0 and waited_sp["draft_busy_share"] == 0.0
    assert beside_sp["draft_bound_steps"] == 0 and 0.0 < beside_sp["draft_busy_share"] <= 1.0


@pytest.mark.unit
def test_load_points_where_the_plan_chooses_whether_to_wait_for_the_draft(tiny_dir, tmp_path, monkeypatch) -> None:
    """draft_waits=None with the cost rule: a draft not yet measured runs beside the pipe (a trial that stalls
    nothing); once measured, a slow draft (a forward of about 4 steps) stays beside it, and a draft of no cost (a
    lookup's) is waited for. The tokens are plain decoding's either way."""
    modes: list[bool] = []
    chosen = Scheduler.waits_for_draft
    monkeypatch.setattr(Scheduler, "waits_for_draft", lambda self: modes.append(chosen(self)) or modes[-1])
    slow = replace(_cost(draft=True), draft=ModelCost("d", 8, _flat(LAYER_S), Table1D([1, 64], [0.0, 0.0])))
    free = replace(_cost(draft=True), draft=None)
    cfg = LoadModelConfig(str(tiny_dir), str(tiny_dir), 4, 3, 3, 16, 4, (2,), (), tmp_path, draft_waits=None)
    for cost, beside in ((slow, True), (free, False)):
        modes.clear()
        points = load_all(replace(cfg, runs_dir=tmp_path / str(beside)), cost, [PROMPT, PROMPT[2:]], log=lambda _: None)
        assert all(r["identical"] for r in compare(points))
        assert False in modes and modes[-1] is not beside  # beside until measured; then waiting unless slow
