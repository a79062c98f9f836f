"""benchmarks.retime: cached section-1 runs re-timed under stored cost models, no model run."""

from __future__ import annotations

import json

import pytest

from benchmarks import report, retime
from benchmarks.costmodel import CostModel
from benchmarks.tbt import timed_block
from shared.types.errors import ConfigError

pytestmark = pytest.mark.unit


def _summary(workload: str, stages: int, tbt: float) -> dict:
    return {"workload": workload, "sampling": "greedy", "stages": stages,
            "tbt_s": {"pp": tbt, "tree": tbt / 2, "specpipe": tbt / 4},
            "speedup_vs_pp": 4.0, "speedup_vs_tree": 2.0, "draft_bound_share": 0.5}


SIDE_BY_SIDE = {  # label: (first block's (workload, N)s, second's, the rows compared)
    "the same rows": ([("a", 2), ("a", 8)], [("a", 2), ("a", 8)], [("a", 2), ("a", 8)]),
    "a row one block lacks is left out": ([("a", 2), ("b", 2)], [("b", 2)], [("b", 2)]),
}


@pytest.mark.parametrize("case", list(SIDE_BY_SIDE))
def test_side_by_side_pairs_the_rows_both_blocks_summarize(case) -> None:
    first, second, expected = SIDE_BY_SIDE[case]
    blocks = [{"summary": [_summary(w, n, 1.0) for w, n in first]},
              {"summary": [_summary(w, n, 0.5) for w, n in second]}]
    rows = retime.side_by_side(blocks)
    assert [(r["workload"], r["stages"]) for r in rows] == expected
    assert all(r["tbt_s"]["pp"] == [1.0, 0.5] and r["tbt_s"]["specpipe"] == [0.25, 0.125] for r in rows)


def test_compare_table_shows_each_value_first_to_second() -> None:
    rows = retime.side_by_side([{"summary": [_summary("a", 2, 1.0)]}, {"summary": [_summary("a", 2, 0.5)]}])
    assert retime.compare_table(rows, ["old", "new"])[4] == (
        "| a | greedy | 2 | 1000.0 → 500.0 | 500.0 → 250.0 | 250.0 → 125.0 | 4.00× → 4.00× | 2.00× → 2.00× "
        "| 50% → 50% |")


RUNS = {  # label: (files in the runs folder, the rows read or the error)
    "one file per policy, N and sampling": (["tbt-pp-N2-greedy-0123abcdef.json", "tbt-pp-N8-t1-0123abcdef.json",
                                             "occupancy-N8-0123abcdef.json"], 2),
    "any config hash is read": (["tbt-pp-N2-greedy-0123abcdef.json", "tbt-tree-N2-greedy-fedcba9876.json"], 2),
    "two configurations of one run": (["tbt-pp-N2-greedy-0123abcdef.json", "tbt-pp-N2-greedy-fedcba9876.json"],
                                      "runs of two configurations"),
    "no run": ([], "no cached section-1 runs"),
}


@pytest.mark.parametrize("case", list(RUNS))
def test_load_runs_reads_every_cached_run_once(case, tmp_path) -> None:
    files, expected = RUNS[case]
    for name in files:
        (tmp_path / name).write_text(json.dumps([{"file": name}]))
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            retime.load_runs(tmp_path)
    else:
        assert len(retime.load_runs(tmp_path)) == expected


def test_the_committed_runs_retimed_give_the_committed_section_one() -> None:
    """Every cost model of results.json's section 1 that benchmarks/costs still holds re-times the committed runs
    to the very numbers the report wrote."""
    blocks = json.loads((report.RESULTS / "results.json").read_text())["tbt"]["summaries"]
    costs = {json.dumps(c.provenance, sort_keys=True): c for c in map(CostModel.load, report.COSTS.glob("*.json"))}
    found = [(b, costs[json.dumps(b["cost"], sort_keys=True)]) for b in blocks
             if json.dumps(b["cost"], sort_keys=True) in costs]
    assert found, "no cost model of results.json's section 1 is stored in benchmarks/costs (committed with it)"
    rows = retime.load_runs(report.RESULTS / "runs")
    width = report.full_config(report.ROOT).width
    for block, cost in found:
        assert json.loads(json.dumps(timed_block(rows, cost, width))) == block
