"""Section 1 re-timed: the cached step records under other cost models, without running any model.

    python -m benchmarks.retime --costs benchmarks/costs/cpu-qwen2.5-coder.json \
        benchmarks/costs/cpu-qwen2.5-coder-fast.json --runs benchmarks/results/runs --out OUT

Steps (tokens per step, draft-bound counts, outputs) come from the models, timing from the cost model,
so a new cost model (new kernels) re-times every cached run `tbt-{policy}-N{stages}-{sampling}-{key}.json` of
RUNS as it is, whatever config hash its name carries. OUT gets section1.md (section 1's table per cost model,
as BENCHMARKS.md renders it, then the first cost model against each other side by side) and section1.json.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

from benchmarks import report
from benchmarks.report_md import cost_block
from benchmarks.tbt import POLICIES, timed_block
from shared.types.config import DTYPES
from shared.types.errors import ConfigError

RUN_NAME = re.compile(r"tbt-(?P<policy>[a-z]+)-N(?P<stages>\d+)-(?P<sampling>\w+)-(?P<key>[0-9a-f]+)\.json")


def load_runs(runs: Path) -> list[dict]:
    """Every cached section-1 row of `runs`; two files for one (policy, N, sampling) are refused (runs of two
    configurations: keep the one to re-time)."""
    seen: dict[tuple, str] = {}
    rows = []
    for path in sorted(runs.glob("tbt-*.json")):
        m = RUN_NAME.fullmatch(path.name)
        if not m:
            continue
        what = (m["policy"], int(m["stages"]), m["sampling"])
        if what in seen:
            raise ConfigError(f"{runs}: {seen[what]} and {path.name} are both {what}: runs of two configurations")
        seen[what] = path.name
        rows += json.loads(path.read_text())
    if not rows:
        raise ConfigError(f"no cached section-1 runs (tbt-*.json) in {runs}")
    return rows


def side_by_side(blocks: list[dict]) -> list[dict]:
    """Per (workload, sampling, N) that every block summarizes: TBT per policy, speedups and draft-bound share,
    one value per block, in the blocks' order."""
    by = [{(s["workload"], s["sampling"], s["stages"]): s for s in b["summary"]} for b in blocks]
    keys = sorted(set(by[0]).intersection(*by[1:]))
    return [{"workload": w, "sampling": s, "stages": n,
             "tbt_s": {p: [b[(w, s, n)]["tbt_s"][p] for b in by] for p in POLICIES},
             **{k: [b[(w, s, n)][k] for b in by] for k in ("speedup_vs_pp", "speedup_vs_tree", "draft_bound_share")}}
            for w, s, n in keys]


def _steps(values: list[float], fmt: str) -> str:
    return " → ".join(fmt.format(v) for v in values)


def compare_table(rows: list[dict], names: list[str]) -> list[str]:
    """side_by_side's rows as a markdown table, each cell 'first → second → ...' in the order of `names`."""
    lines = [f"Side by side ({' → '.join(names)}):", "",
             ("| workload | sampling | N | TBT ms pp | TBT ms tree | TBT ms specpipe | specpipe vs pp | "
              "specpipe vs tree | draft-bound |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tbt = " | ".join(_steps([1000 * s for s in r["tbt_s"][p]], "{:.1f}") for p in POLICIES)
        lines.append(f"| {r['workload']} | {r['sampling']} | {r['stages']} | {tbt} | "
                     f"{_steps(r['speedup_vs_pp'], '{:.2f}×')} | {_steps(r['speedup_vs_tree'], '{:.2f}×')} | "
                     f"{_steps(r['draft_bound_share'], '{:.0%}')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    full = report.full_config(report.ROOT)
    p = argparse.ArgumentParser(prog="python -m benchmarks.retime", description=__doc__.splitlines()[0])
    p.add_argument("--costs", type=Path, nargs="+", required=True, help="stored cost models (JSON); never measured")
    p.add_argument("--runs", type=Path, default=full.runs, help="the cached runs (default: the report's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--draft-dtype", choices=DTYPES, default=full.draft_dtype,
                   help="the draft's dtype in those runs; every cost model must have timed its draft so")
    p.add_argument("--width", type=int, default=full.width, help="W of the runs (the draft-pace note)")
    a = p.parse_args(argv)
    missing = [c for c in a.costs if not c.exists()]
    if missing:  # report.cost_models would measure a missing first one: hours, never here
        raise ConfigError(f"cost model not found: {missing[0]}")
    costs = report.cost_models(replace(full, cost_models=tuple(a.costs), draft_dtype=a.draft_dtype), print)
    rows = load_runs(a.runs)
    blocks = [timed_block(rows, c, a.width) for c in costs]
    lines = [f"# Section 1 re-timed: {len(rows)} cached runs of {a.runs}", ""]
    for path, block in zip(a.costs, blocks):
        lines += [f"## {path.name}", "", *cost_block(block), ""]
    for path, block in zip(a.costs[1:], blocks[1:]):
        lines += [*compare_table(side_by_side([blocks[0], block]), [a.costs[0].stem, path.stem]), ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "section1.md").write_text("\n".join(lines))
    (a.out / "section1.json").write_text(json.dumps({"runs": str(a.runs), "costs": [str(c) for c in a.costs],
                                                     "summaries": blocks}, indent=1))
    print(f"wrote {a.out / 'section1.md'}")
    return 0


if __name__ == "__main__":
    import sys

    from shared.types.errors import SpecPipeError

    try:
        raise SystemExit(main(sys.argv[1:]))
    except SpecPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
