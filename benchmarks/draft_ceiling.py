"""What a draft allows SpecPipe: its hit rates on the target's own outputs, and the real scheduler's tokens per step
replayed on them, with no forward.

    python -m benchmarks.draft_ceiling [--model smollm2-135m] [--prompt-files sum.jsonl,mt_bench.jsonl,alpaca.jsonl]
        [--prompts 16] [--tokens 96] [--stages 2] [--bandwidth bandwidth.json] [--runs runs.json] [--out result.json]

1. The target greedy-decodes each prompt once (transformers `generate()`, fp32, as benchmarks.hf_baseline), keeping
   its top-4 tokens at every position. `--runs` caches these runs (decoding is most of the time).
2. **Hit rates** of the prompt-lookup draft (shared/drafting/ngram.py) at every output position, given the true text
   before it: how often it proposes nothing, and how often its first (first two) proposals hold the target's token.
   Beside it, two fallbacks a lookup that proposes nothing could take:
   - `shared`: NgramSource's table across requests (`shared_tokens`), unbounded here: the followers of the longest
     n-gram (4 tokens down to 1) in the prompts and outputs of the requests served before;
   - `recycled`: the target's top-2 after the same last token, the last time the target was seen there (across
     requests too: Token Recycling, Luo et al. 2024).
3. **Replay.** The executor's own loop (`specpipe.executor.InProcessPipeline`) serves each prompt with the real
   `Scheduler` (specpipe policy, budget width rule at a fixed width) and the real n-gram source (with a shared table
   of SHARED tokens in the `shared` setting, filled by the prompts served before it); its stages compute nothing and
   the last one reads the target token after each row from the decoded output (a verified frontier is always on
   it). The replayed output must equal the decoded one. Tokens per step count each
   request's steps from its first token's refill to its last token (`RequestStats.steps`), as the services do;
   plain PP gives 1 / (stages + lag).
4. With `--bandwidth` (a benchmarks.bandwidth result of the same model), SpecPipe's one-request decode rate over
   PP's that each setting allows: tokens/step x PP's token (its one-row stages alone, one after another) / SpecPipe's
   step (the slowest stage at the setting's rows per step, interpolated between the timed rows), the stages beside
   each other on that host, or alone (nothing shared, as with a device per stage; but at this host's cost per row).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from benchmarks.hf_baseline import load_hf
from benchmarks.provenance import machine
from benchmarks.serving import ServingConfig, bench_prompts
from scheduler.scheduler import Phase, Request, Scheduler
from shared.drafting.ngram import NgramSource
from shared.types.batch import MicroBatch, StageOutput
from shared.types.config import EngineConfig, PolicyConfig
from specpipe.executor import InProcessPipeline

TOP = 4  # target tokens kept per position (the recycled fallback reads 2)
SHARED = 1 << 16  # tokens of finished requests' text the shared settings' n-gram table keeps


class Setting(NamedTuple):
    refill: int
    width: int
    async_scheduling: bool = False
    shared_tokens: int = 0  # NgramSource's table across requests (0: none)


# the services' defaults at 2 stages: refill 2, synchronous, no shared table (the cost rule chooses the width)
SETTINGS = {"refill 1, width 1": Setting(1, 1), "refill 2, width 1": Setting(2, 1), "refill 2, width 2": Setting(2, 2),
            "refill 3, width 2": Setting(3, 2), "refill 2, width 2, async": Setting(2, 2, True),
            "refill 2, width 2, shared": Setting(2, 2, shared_tokens=SHARED)}


@dataclass(frozen=True)
class Run:
    """One prompt's greedy decoding: the output and the target's top tokens at each output position."""

    file: str
    prompt: list[int]
    output: list[int]
    top: list[list[int]]  # [len(output)][TOP]


def decode(model: str, prompts: list[dict], tokens: int) -> list[Run]:
    """Each prompt greedy-decoded by transformers (fp32), with the top TOP tokens at each step."""
    hf, _ = load_hf(model)
    runs = []
    for p in prompts:
        ids = torch.tensor([p["ids"]])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)
        output = out.sequences[0, ids.shape[1]:].tolist()
        runs.append(Run(p["file"], list(p["ids"]), output, [s[0].topk(TOP).indices.tolist() for s in out.scores]))
    return runs


# ---- hit rates ---------------------------------------------------------------------------------------------
def hit_rates(runs: list[Run]) -> dict[str, dict]:
    """Per prompt file, per draft (lookup, lookup>shared, lookup>recycled): the share of positions where it
    proposed nothing, and where its top-1 / top-2 held the target's token. Runs are taken in order: the shared and
    recycled tables hold what came before."""
    lookup, shared, recycled = NgramSource(), NgramSource(shared_tokens=1 << 30).shared, {}
    counts: dict[str, dict[str, Counter]] = {}
    for run in runs:
        by_draft = counts.setdefault(run.file, {d: Counter() for d in ("lookup", "lookup>shared", "lookup>recycled")})
        for i, token in enumerate(run.output):
            context = run.prompt + run.output[:i]
            first = [t for t, _ in lookup.propose(context, 2)]
            drafts = {"lookup": first, "lookup>shared": first or [t for t, _ in shared.lookup(context, 2)],
                      "lookup>recycled": first or recycled.get(context[-1], [])[:2]}
            for name, proposed in drafts.items():
                c = by_draft[name]
                c["positions"] += 1
                c["none"] += not proposed
                c["top1"] += proposed[:1] == [token]
                c["top2"] += token in proposed[:2]
            recycled[context[-1]] = run.top[i]
        shared.add(run.prompt + run.output)
    return {file: {name: {"positions": c["positions"], **{k: c[k] / c["positions"] for k in ("none", "top1", "top2")}}
                   for name, c in by_draft.items()} for file, by_draft in counts.items()}


# ---- replay --------------------------------------------------------------------------------------------------
class _ReplayedStage:
    """A stage that computes nothing: it passes a micro-batch on, and the last stage returns the target's token after
    each row, read from the decoded text (a verified frontier is always on it)."""

    def __init__(self, text: list[int] | None):
        self.text = text  # None: not the last stage

    def add_request(self, request_id: str, info: object, capacity: int) -> None:
        pass

    def apply(self, events: list) -> None:
        pass

    def take_failures(self) -> dict[str, str]:
        return {}

    def forward(self, batch: MicroBatch) -> MicroBatch | StageOutput:
        if self.text is None:
            return batch
        after = lambda r: self.text[r.position + 1] if r.needs_target and r.position + 1 < len(self.text) else -1
        return StageOutput(batch.batch_id, batch.rows, [after(r) for r in batch.rows])


def replay(run: Run, stages: int, setting: Setting, draft: NgramSource | None = None) -> dict:
    """One request served by the executor's loop (specpipe/executor.py) with the real scheduler and an n-gram source
    (`draft`, which may hold earlier requests' text; a new one if None), its stages replayed from `run`: {"tokens",
    "steps", "rows"} from its first token's refill to its last token."""
    text = run.prompt + run.output
    policy = PolicyConfig("specpipe", stages, setting.width, refill_depth=setting.refill, width_rule="budget",
                          async_scheduling=setting.async_scheduling)
    scheduler = Scheduler(policy, EngineConfig(), len(text) + 1)
    draft = draft if draft is not None else NgramSource(shared_tokens=setting.shared_tokens)
    replayed = [_ReplayedStage(text if k == stages - 1 else None) for k in range(stages)]
    pipe = InProcessPipeline(replayed, scheduler, draft, trace_limit=1)
    state = pipe.submit(Request("r", tuple(run.prompt), max_new_tokens=len(run.output)))
    rows = 0
    while state.phase is not Phase.DONE:
        pipe.step()
        rows += len(pipe.trace[-1].stages[0]) if state.stats.first_decode_step is not None else 0
    if state.output != run.output:
        raise RuntimeError(f"replay diverged from the decoded output at {_first_diff(state.output, run.output)}")
    return {"tokens": len(run.output) - 1, "steps": state.stats.steps, "rows": rows}


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def replays(runs: list[Run], stages: int, settings: dict[str, Setting]) -> dict[str, dict]:
    """Per prompt file, per setting: tokens per step and rows per step, summed over its runs. Each setting serves
    every run in order with one n-gram source (its shared table, if any, holds the runs served before)."""
    out: dict[str, dict] = {file: {} for file in dict.fromkeys(r.file for r in runs)}
    for label, setting in settings.items():
        draft = NgramSource(shared_tokens=setting.shared_tokens)
        done = [(r.file, replay(r, stages, setting, draft)) for r in runs]
        for file, by_setting in out.items():
            steps = max(sum(d["steps"] for f, d in done if f == file), 1)
            by_setting[label] = {"tokens_per_step": sum(d["tokens"] for f, d in done if f == file) / steps,
                                 "rows_per_step": sum(d["rows"] for f, d in done if f == file) / steps,
                                 "pp_tokens_per_step": 1 / (stages + int(setting.async_scheduling))}
    return out


def allowed(tokens_per_step: float, rows_per_step: float, bandwidth: dict) -> dict[str, dict]:
    """Per numerics mode of a bandwidth.json: SpecPipe's decode rate over PP's at these tokens per step, with the
    stages sharing the host and with nothing shared (as with a device per stage). PP's token is its one-row stages
    alone, one after another; SpecPipe's step is the slowest stage at `rows_per_step`, interpolated between the
    timed rows (held at the first and last)."""
    out = {}
    for mode in dict.fromkeys(s["numerics"] for s in bandwidth["stages"]):
        timed = sorted((s for s in bandwidth["stages"] if s["numerics"] == mode), key=lambda s: s["rows"])
        rows = [s["rows"] for s in timed]
        step = {k: float(np.interp(rows_per_step, rows, [max(s[f"{k}_s"]) for s in timed]))
                for k in ("beside", "alone")}
        pp_token = timed[0]["pp_token_s"]  # its fewest rows: one, where timed
        out[mode] = {"here": tokens_per_step * pp_token / step["beside"],
                     "device_per_stage": tokens_per_step * pp_token / step["alone"]}
    return out


# ---- command line --------------------------------------------------------------------------------------------
def load_runs(path: Path) -> list[Run]:
    return [Run(**r) for r in json.loads(path.read_text())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.draft_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt-files", default="sum.jsonl,mt_bench.jsonl,alpaca.jsonl")
    p.add_argument("--prompts-dir", default=ServingConfig.prompts_dir)
    p.add_argument("--prompts", type=int, default=16, help="the first K prompts of each file")
    p.add_argument("--tokens", type=int, default=96, help="greedy tokens decoded per prompt")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--bandwidth", type=Path, default=None, help="a benchmarks.bandwidth result of the same model")
    p.add_argument("--runs", type=Path, default=None, help="decoded runs: read if present, else written")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    start = time.perf_counter()
    if a.runs is not None and a.runs.exists():
        runs = load_runs(a.runs)
    else:
        cfg = ServingConfig(prompts_dir=a.prompts_dir, prompt_files=tuple(a.prompt_files.split(",")))
        runs = decode(a.model, bench_prompts(cfg, a.model, a.prompts), a.tokens)
        if a.runs is not None:
            a.runs.write_text(json.dumps([r.__dict__ for r in runs]))
    result = {"machine": machine(), "model": a.model, "prompts": len(runs), "stages": a.stages,
              "tokens": sum(len(r.output) for r in runs), "hit_rates": hit_rates(runs),
              "replay": replays(runs, a.stages, SETTINGS)}
    if a.bandwidth is not None:
        bandwidth = json.loads(a.bandwidth.read_text())
        result["bandwidth"] = str(a.bandwidth)
        for r in (r for by_setting in result["replay"].values() for r in by_setting.values()):
            r["allows_over_pp"] = allowed(r["tokens_per_step"], r["rows_per_step"], bandwidth)
    result["elapsed_s"] = time.perf_counter() - start
    print(report(result))
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


def report(result: dict) -> str:
    lines = [f"# {result['model']}, {result['prompts']} prompts, {result['tokens']} tokens; {result['machine']}",
             "file      draft            none   top-1  top-2"]
    for file, by_draft in result["hit_rates"].items():
        lines += [f"{file:9s} {name:16s} {h['none']:.3f}  {h['top1']:.3f}  {h['top2']:.3f}"
                  for name, h in by_draft.items()]
    lines.append(f"file      setting ({result['stages']} stages)      tok/step rows/step  "
                 "allows over pp: here | nothing shared")
    for file, by_setting in result["replay"].items():
        for label, r in by_setting.items():
            over = "  ".join(f"{m} {x['here']:.2f}x | {x['device_per_stage']:.2f}x"
                             for m, x in r.get("allows_over_pp", {}).items())
            lines.append(f"{file:9s} {label:26s} {r['tokens_per_step']:.3f}    {r['rows_per_step']:.2f}      {over}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
