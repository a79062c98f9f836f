"""Section 1 (modeled): one request at a time, time between tokens per policy and stage count.

For every sampling setting, stage count N and policy, one in-process pipeline
serves every prompt alone; steps are counted with the real models and recorded
(benchmarks/timeline.py), then timed with each cost model. Runs are cached per
(policy, N, sampling) under OUT/runs/ so an interrupted full run resumes and a
new cost model re-times old runs without re-running the models (`python -m
benchmarks.retime` does only that). A run's name hashes its config and
prompts, not the engine's numerics: cached runs counted with exact kernels are
kept when the default becomes fast (fast may diverge from them in a few tokens).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from benchmarks.costmodel import CostModel
from benchmarks.timeline import StepClock, StepRecord, replay, run_modeled
from scheduler.occupancy import Occupancy
from scheduler.scheduler import Request
from shared.model_store import load_tokenizer, resolve_model
from shared.types.config import EngineConfig, PolicyConfig, SamplingParams
from specpipe.engine import SimulationConfig, build_pipeline
from specpipe.prompts import encode_chat, read_prompts

POLICIES = ("pp", "tree", "specpipe")


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[tuple[str, list[int]]]  # (prompt id, token ids through the chat template)


def workloads_of(model: str, files, per_file: int) -> list[Workload]:
    """The first `per_file` prompts of each prompt file, chat-encoded for `model`."""
    tokenizer = load_tokenizer(resolve_model(model))
    return [Workload(path.stem, [(p.prompt_id, encode_chat(tokenizer, p.text)) for p in read_prompts(path, per_file)])
            for path in files]


@dataclass(frozen=True)
class TbtConfig:
    model: str
    draft: str
    stages: tuple[int, ...]
    samplings: dict[str, SamplingParams]
    max_new_tokens: int
    width: int
    depth: int
    refill_depth: int
    runs_dir: Path
    draft_dtype: str = "float32"
    sampled_stages: tuple[int, ...] | None = None  # stage counts for non-greedy samplings; None: `stages`

    def stages_for(self, sampling: str) -> tuple[int, ...]:
        return self.stages if sampling == "greedy" or self.sampled_stages is None else self.sampled_stages

    def draft_key(self, policy: str = "specpipe") -> tuple[str, ...]:
        """The draft's part of a cached run's name: its dtype only when it is not the default (older runs keep
        their names) and the policy drafts at all (pp's runs serve every draft dtype)."""
        return (self.draft,) if self.draft_dtype == "float32" or policy == "pp" else (self.draft, self.draft_dtype)


def digest(*parts) -> str:
    """A short name for what a cached run depends on (config and prompts): a changed setting is a new run."""
    text = json.dumps([repr(p) for p in parts], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _pipeline(cfg: TbtConfig, policy: str, stages: int, occupancy: Occupancy | None = None):
    sim = SimulationConfig(cfg.model, cfg.draft,
                           PolicyConfig(policy, stages, cfg.width, cfg.depth, cfg.refill_depth),
                           EngineConfig(max_new_tokens=cfg.max_new_tokens, draft_dtype=cfg.draft_dtype))
    pipe, _, arch = build_pipeline(sim, trace_limit=2)
    pipe.occupancy = occupancy
    return pipe, arch


def run_policy(cfg: TbtConfig, workloads: list[Workload], policy: str, stages: int, sampling: str) -> list[dict]:
    """Every prompt of every workload alone through one pipeline, step records kept; cached as JSON."""
    key = digest(cfg.model, *cfg.draft_key(policy), cfg.samplings[sampling], cfg.max_new_tokens, cfg.width, cfg.depth,
                 cfg.refill_depth, workloads)  # what the run depends on (not the other stage counts)
    path = cfg.runs_dir / f"tbt-{policy}-N{stages}-{sampling}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    pipe, arch = _pipeline(cfg, policy, stages)
    rows = []
    for w in workloads:
        for pid, ids in w.prompts:
            rid = f"{w.name}-{pid}"
            request = Request(rid, tuple(ids), cfg.samplings[sampling], cfg.max_new_tokens)
            run = run_modeled(pipe, None, [request], concurrency=1)
            state = pipe.scheduler.requests[rid]
            rows.append({
                "workload": w.name, "prompt": pid, "policy": policy, "stages": stages, "sampling": sampling,
                "layers": arch.num_layers, "tokens": len(run.outputs[rid]), "steps": state.stats.steps,
                "accepted": state.stats.accepted, "output": run.outputs[rid],
                "records": [r.to_json() for r in run.records],
            })
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return rows


def run_all(cfg: TbtConfig, workloads: list[Workload], log=print) -> list[dict]:
    rows = []
    for sampling in cfg.samplings:
        for stages in cfg.stages_for(sampling):
            for policy in POLICIES:
                log(f"  tbt: {policy} N={stages} {sampling}")
                rows += run_policy(cfg, workloads, policy, stages, sampling)
    return rows


def timed(rows: list[dict], cost: CostModel) -> list[dict]:
    """The rows with TBT, TTFT and draft-bound steps under one cost model (records dropped)."""
    out = []
    for r in rows:
        clock = StepClock(cost, r["policy"], r["layers"], r["stages"])
        times, bound = replay([StepRecord.from_json(x) for x in r["records"]], clock)
        out.append({**{k: v for k, v in r.items() if k != "records"}, "tbt_s": times.tbt, "ttft_s": times.ttft,
                    "draft_bound_steps": bound, "decode_steps": len(r["records"])})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per (workload, sampling, N) of timed rows: mean TBT and tokens/step per policy, speedups, identity."""
    out = []
    keys = sorted({(r["workload"], r["sampling"], r["stages"]) for r in rows})
    for workload, sampling, stages in keys:
        group = [r for r in rows if (r["workload"], r["sampling"], r["stages"]) == (workload, sampling, stages)]
        by = {p: [r for r in group if r["policy"] == p] for p in POLICIES}
        if not all(by.values()):
            continue
        tbt = {p: statistics.mean(r["tbt_s"] for r in by[p] if r["tbt_s"]) for p in POLICIES}
        tps = {p: sum(r["tokens"] for r in by[p]) / max(sum(r["steps"] for r in by[p]), 1) for p in POLICIES}
        outputs = {p: [r["output"] for r in by[p]] for p in POLICIES}
        out.append({
            "workload": workload, "sampling": sampling, "stages": stages, "prompts": len(by["pp"]),
            "tbt_s": tbt, "tokens_per_step": tps,
            "speedup_vs_pp": tbt["pp"] / tbt["specpipe"], "speedup_vs_tree": tbt["tree"] / tbt["specpipe"],
            "draft_bound_share": sum(r["draft_bound_steps"] for r in by["specpipe"])
            / max(sum(r["decode_steps"] for r in by["specpipe"]), 1),
            "identical": outputs["pp"] == outputs["tree"] == outputs["specpipe"],
        })
    return out


def timed_block(rows: list[dict], cost: CostModel, width: int) -> dict:
    """Section 1 under one cost model: its provenance, the summary of the timed rows, the draft's pace per N."""
    stages = sorted({r["stages"] for r in rows})
    return {"cost": cost.provenance, "summary": summarize(timed(rows, cost)),
            "pace": [pace(cost, rows[0]["layers"], n, width) for n in stages]}


def pace(cost: CostModel, num_layers: int, stages: int, width: int, context: int = 512) -> dict:
    """Why specpipe may be draft-bound: one drafted level (W rows) against one pipeline step at N stages."""
    last = StepClock(cost, "specpipe", num_layers, stages).layers[-1]
    step = cost.target.forward(1, context, last, head=True) + (cost.transfer(1) if stages > 1 else 0.0)
    draft = cost.draft.forward(width, context) if cost.draft else 0.0
    return {"stages": stages, "step_s": step, "draft_level_s": draft}


def occupancy_columns(cfg: TbtConfig, prompt: list[int], stages: int, steps: int = 40,
                      cache: Path | None = None) -> dict[str, list]:
    """The stage x step grid of one request under pp and specpipe (for the occupancy plot)."""
    key = digest(cfg.model, *cfg.draft_key(), cfg.width, cfg.refill_depth, prompt)
    path = cache / f"occupancy-N{stages}-{key}.json" if cache else None
    if path and path.exists():
        return json.loads(path.read_text())
    grids = {}
    for policy in ("pp", "specpipe"):
        occ = Occupancy(stages, keep=100_000)
        pipe, _ = _pipeline(cfg, policy, stages, occ)
        state = pipe.generate(Request("occ", tuple(prompt), SamplingParams(), cfg.max_new_tokens))
        occ.flush()
        start = state.stats.first_decode_step
        grids[policy] = [c for c in occ.columns if c["step"] >= start][:steps]
    if path:
        path.write_text(json.dumps(grids))
    return grids
