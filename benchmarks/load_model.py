"""Section 3 (modeled): many requests, SpecPipe-DB against plain PP with continuous batching.

Both policies serve the same requests through the in-process executor with
the scheduler's dynamic batching (a micro-batch mixes requests up to the token
budget; SpecPipe-DB narrows the tree as the batch fills), and the cost model
times every step. Loads: fixed concurrency (closed loop: a new request the
moment one finishes) and Poisson arrivals at rates set as fractions of plain
PP's saturated throughput (so the sweep means the same thing on any hardware).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.costmodel import CostModel
from benchmarks.stats import pct
from benchmarks.tbt import digest
from benchmarks.timeline import ModeledRun, StepClock, run_modeled
from scheduler.scheduler import Request
from shared.types.config import EngineConfig, PolicyConfig, SamplingParams
from specpipe.engine import SimulationConfig, build_pipeline


@dataclass(frozen=True)
class LoadModelConfig:
    model: str
    draft: str
    stages: int
    width: int
    refill_depth: int
    max_new_tokens: int
    requests: int  # requests per load point
    concurrency: tuple[int, ...]
    rate_fractions: tuple[float, ...]  # Poisson rates as fractions of pp's saturated request rate
    runs_dir: Path
    seed: int = 0
    draft_dtype: str = "float32"
    draft_vocab: int = 0  # > 0: the draft's head scores this many frequent tokens and each request's own (EngineConfig)
    width_rule: str = "cost"  # specpipe's (PolicyConfig.width_rule); "budget" is the rule before the cost plan
    draft_waits: bool | None = True  # specpipe's (PolicyConfig.draft_waits); False: beside, None: the plan chooses


def _summary(run: ModeledRun) -> dict:
    gaps = [g for t in run.requests.values() for g in t.gaps]
    ttft = [t.ttft for t in run.requests.values() if t.token_times]
    return {
        "tokens": run.tokens, "steps": run.steps, "seconds": run.seconds,
        "tokens_per_s": run.tokens / run.seconds if run.seconds else 0.0,
        "tokens_per_step": run.tokens / run.steps if run.steps else 0.0,
        "tbt_s": {"mean": statistics.mean(gaps) if gaps else None, "p50": pct(gaps, 50), "p99": pct(gaps, 99)},
        "ttft_s": {"mean": statistics.mean(ttft) if ttft else None, "p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "draft_bound_steps": run.draft_bound_steps,
        # a draft beside the pipe: the share of the run it computed (1: it never idled; forwards asked for levels
        # that came too late count too)
        "draft_busy_share": min(1.0, run.draft_busy_s / run.seconds) if run.seconds else 0.0,
        "outputs": dict(sorted(run.outputs.items())),
    }


def run_point(cfg: LoadModelConfig, cost: CostModel, prompts: list[list[int]], policy: str,
              concurrency: int | None = None, rate: float | None = None) -> dict:
    """One load point for one policy (cached as JSON)."""
    label = f"c{concurrency}" if concurrency else f"r{rate:.4g}"
    if policy == "pp":
        cfg = replace(cfg, width_rule="cost", draft_waits=True)  # pp ignores both: one cached run serves all
    point_cfg = replace(cfg, concurrency=(), rate_fractions=(), runs_dir=Path())  # not the other points, not where
    path = cfg.runs_dir / f"load-{policy}-N{cfg.stages}-{label}-{digest(point_cfg, prompts, cost.provenance)}.json"
    if path.exists():
        return json.loads(path.read_text())
    sim = SimulationConfig(cfg.model, cfg.draft,
                           PolicyConfig(policy, cfg.stages, cfg.width, refill_depth=cfg.refill_depth,
                                        width_rule=cfg.width_rule, draft_waits=cfg.draft_waits),
                           EngineConfig(max_new_tokens=cfg.max_new_tokens, draft_dtype=cfg.draft_dtype,
                                        draft_vocab=cfg.draft_vocab))
    if cfg.draft == "ngram":
        cost = replace(cost, draft=None)  # a lookup, not a forward: drafting costs no step time
    pipe, _, arch = build_pipeline(sim, trace_limit=2)
    requests = [Request(f"q{i}", tuple(prompts[i % len(prompts)]), SamplingParams(), cfg.max_new_tokens)
                for i in range(cfg.requests)]
    arrivals = None
    if rate:
        rng, t = random.Random(cfg.seed), 0.0
        arrivals = [t := t + rng.expovariate(rate) for _ in requests]
    run = run_modeled(pipe, StepClock(cost, policy, arch.num_layers, cfg.stages), requests, arrivals, concurrency)
    point = {"policy": policy, "concurrency": concurrency, "rate": rate, **_summary(run)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point))
    return point


def run_all(cfg: LoadModelConfig, cost: CostModel, prompts: list[list[int]], log=print) -> list[dict]:
    points = []
    for c in cfg.concurrency:
        for policy in ("pp", "specpipe"):
            log(f"  load (modeled, N={cfg.stages}): {policy} concurrency {c}")
            points.append(run_point(cfg, cost, prompts, policy, concurrency=c))
    saturated = max(p["tokens_per_s"] for p in points if p["policy"] == "pp") / cfg.max_new_tokens  # requests/s
    for fraction in cfg.rate_fractions:
        for policy in ("pp", "specpipe"):
            log(f"  load (modeled, N={cfg.stages}): {policy} Poisson {fraction:.2f} x pp's saturation")
            point = run_point(cfg, cost, prompts, policy, rate=fraction * saturated)
            points.append({**point, "rate_fraction": fraction})
    return points


def compare(points: list[dict]) -> list[dict]:
    """specpipe / pp at each load point: throughput ratio, TBT ratio, identical outputs."""
    out = []
    key = lambda p: (p["concurrency"], p.get("rate_fraction"))
    pp = {key(p): p for p in points if p["policy"] == "pp"}
    for p in points:
        if p["policy"] != "specpipe" or key(p) not in pp:
            continue
        base = pp[key(p)]
        out.append({
            "concurrency": p["concurrency"], "rate_fraction": p.get("rate_fraction"), "rate": p["rate"],
            "throughput": {"pp": base["tokens_per_s"], "specpipe": p["tokens_per_s"]},
            "tokens_per_step": {"pp": base["tokens_per_step"], "specpipe": p["tokens_per_step"]},
            "tbt_mean": {"pp": base["tbt_s"]["mean"], "specpipe": p["tbt_s"]["mean"]},
            "tbt_p99": {"pp": base["tbt_s"]["p99"], "specpipe": p["tbt_s"]["p99"]},
            "ttft_p50": {"pp": base["ttft_s"]["p50"], "specpipe": p["ttft_s"]["p50"]},
            "throughput_ratio": p["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None,
            "tbt_ratio": base["tbt_s"]["mean"] / p["tbt_s"]["mean"] if p["tbt_s"]["mean"] else None,
            "identical": p["outputs"] == base["outputs"],
        })
    return out


def width_rules(cfg: LoadModelConfig, cost: CostModel, prompts: list[list[int]], rules: tuple[str, ...],
                log=print) -> list[dict]:
    """pp and specpipe under each width rule (cost: the plan; budget: the rule before it), at every load point."""
    return [{**r, "rule": rule} for rule in rules
            for r in compare(run_all(replace(cfg, width_rule=rule), cost, prompts, log))]


def markdown(rows: list[dict]) -> list[str]:
    lines = [("| load | width rule | throughput tok/s pp → specpipe | ratio | tokens/step pp → specpipe "
              "| TBT mean ms pp → specpipe | identical |"), "|---|---|---|---|---|---|---|"]
    for x in sorted(rows, key=lambda x: (x["concurrency"] is None, x["concurrency"] or 0, x["rate_fraction"] or 0, x["rule"])):
        load = f"{x['concurrency']} concurrent" if x["concurrency"] else f"Poisson {x['rate_fraction']:.2f}× sat."
        t, k, b = x["throughput"], x["tokens_per_step"], x["tbt_mean"]
        lines.append(f"| {load} | {x['rule']} | {t['pp']:.2f} → {t['specpipe']:.2f} | **{x['throughput_ratio']:.2f}×** "
                     f"| {k['pp']:.2f} → {k['specpipe']:.2f} | {b['pp'] * 1e3:.1f} → {b['specpipe'] * 1e3:.1f} "
                     f"| {'yes' if x['identical'] else 'NO'} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    import argparse

    from benchmarks.tbt import workloads_of

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--costs", type=Path, required=True, help="a cost model JSON (benchmarks/costs/)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b", help="a draft model, or ngram")
    p.add_argument("--draft-dtype", default="float32")
    p.add_argument("--draft-vocab", type=int, default=0, help="tokens the draft's LM head scores (0: all); the cost "
                   "model must have timed that head (specpipe bench costs --draft-vocab)")
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--refill-depth", type=int, default=7)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", default="2,8")
    p.add_argument("--rates", default="1.0", help="Poisson rates as fractions of pp's saturation")
    p.add_argument("--prompts", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts",
                   help="a folder of prompt files (*.jsonl)")
    p.add_argument("--prompts-per-file", type=int, default=1)
    p.add_argument("--rules", default="cost,budget", help="specpipe's width rules to run")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--draft-beside", action="store_true",
                      help="specpipe never waits for the draft: it runs beside the pipe, a level enters once drafted")
    mode.add_argument("--draft-auto", action="store_true",
                      help="specpipe's width plan chooses, plan by plan, between waiting for the draft and not")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/load-model"))
    a = p.parse_args(argv)
    cfg = LoadModelConfig(a.model, a.draft, a.stages, a.width, a.refill_depth, a.tokens, a.requests,
                          tuple(int(c) for c in a.concurrency.split(",")),
                          tuple(float(r) for r in a.rates.split(",") if r), a.out / "runs", draft_dtype=a.draft_dtype,
                          draft_vocab=a.draft_vocab,
                          draft_waits=None if a.draft_auto else not a.draft_beside)
    prompts = [ids for w in workloads_of(a.model, sorted(a.prompts.glob("*.jsonl")), a.prompts_per_file)
               for _, ids in w.prompts]
    cost = CostModel.load(a.costs)
    timed = cost.provenance.get("draft_vocab", 0)  # older files: the whole vocabulary
    if a.draft != "ngram" and timed != a.draft_vocab:
        raise SystemExit(f"error: {a.costs.name} timed a draft head over {timed or 'every'} token(s), this run "
                         f"drafts over {a.draft_vocab or 'every'}: measure one with specpipe bench costs --draft-vocab")
    rows = width_rules(cfg, cost, prompts, tuple(a.rules.split(",")))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rows.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
