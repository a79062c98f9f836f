"""Per-step overhead of the wire against stage compute, on a real local cluster.

    python -m benchmarks.wire_overhead [--model smollm2-135m] [--stages 2] [--requests 8] [--concurrency 4]

Per pipeline step (one scheduler cycle: take drafts -> schedule -> StepMsg -> VerifyMsg back -> tokens
published), its wall time split into parts that add up: compute (some stage is computing), scheduler (its
own work while no stage computes), draft wait (waiting for proposals while no stage computes) and wire, the
rest (Redis round trips, msgpack, torch.distributed send/recv, stages applying events). The split takes
every process's intervals on the host's monotonic clock, so it holds for a cluster on one host.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import subprocess
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise

from benchmarks.provenance import machine
from shared.environment import env
from shared.model_store import load_tokenizer, resolve_model
from shared.transport.queue_client import collect, submit
from shared.transport.redis_io import RedisConfig, alive, connect, ensure_redis, pipeline_components, stage_name
from shared.types.config import DEFAULT_NUMERICS, NUMERICS
from shared.wire.messages import RequestMsg
from specpipe.cluster import (
    MEASURED,
    ClusterConfig,
    delete_keys,
    pipeline_commands,
    resolve_layer_split,
    stop_processes,
)
from specpipe.prompts import encode_chat, read_prompts


def run(args: argparse.Namespace) -> dict:
    redis_proc = ensure_redis(args.redis_url)
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    cfg = ClusterConfig(model=args.model, draft="ngram", policy=args.policy, stages=args.stages, width=args.width,
                        redis_url=args.redis_url, prefix=prefix, master_port=args.master_port,
                        layer_split=args.layer_split, threads=args.threads, numerics=args.numerics)
    cfg = resolve_layer_split(cfg)
    rcfg = RedisConfig(args.redis_url, prefix)
    r = connect(rcfg)
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cmd in pipeline_commands(cfg).values()]
    try:
        while not all(alive(r, rcfg, n) for n in pipeline_components(args.stages)):
            time.sleep(0.2)
        tokenizer = load_tokenizer(resolve_model(args.model))
        prompts = read_prompts(args.prompts, args.requests)
        for start in range(0, len(prompts), args.concurrency):
            batch = prompts[start : start + args.concurrency]
            for i, p in enumerate(batch, start):
                submit(r, rcfg, RequestMsg(f"b{i}", encode_chat(tokenizer, p.text), args.max_new_tokens))
            for i in range(start, start + len(batch)):
                collect(r, rcfg, f"b{i}", timeout_s=600)
        time.sleep(2.5)  # stages flush their timings when idle
        return summarize(r, rcfg, args, cfg.layer_split)
    finally:
        stop_processes(procs)
        delete_keys(r, prefix)
        if redis_proc is not None:
            redis_proc.terminate()


@dataclass(frozen=True)
class StepTimes:
    """One scheduler step on the host's monotonic clock (seconds). The scheduler works in [start, wait_start],
    [wait_end, published] and [verified, end]; it waits for the draft in [wait_start, wait_end] and for the
    stages in [published, verified]. `compute` holds every stage's forward interval of this step (a stage that
    is not on the critical path may still compute after `verified`, into the next step's draft wait)."""

    step: int
    rows: int
    start: float
    wait_start: float
    wait_end: float
    published: float
    verified: float
    end: float
    compute: tuple[tuple[float, float], ...]

    def scheduler_work(self) -> list[tuple[float, float]]:
        return [(self.start, self.wait_start), (self.wait_end, self.published), (self.verified, self.end)]


def step_rows(r, rcfg: RedisConfig, stages: int, first_step: int = 1, last_step: int | None = None) -> list[StepTimes]:
    """The steps in [first_step, last_step] that every stage has reported, from the `timings:*` lists the
    scheduler and the stages push."""
    compute: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for k in range(stages):
        for item in r.lrange(rcfg.key("timings", stage_name(k)), 0, -1):
            step, start, secs = item.decode().split(":")
            compute[int(step)].append((float(start), float(start) + float(secs)))
    rows = []
    for item in r.lrange(rcfg.key("timings", "scheduler"), 0, -1):
        step, n, *stamps = item.decode().split(":")
        s = int(step)
        if s >= first_step and (last_step is None or s <= last_step) and len(compute[s]) == stages:
            rows.append(StepTimes(s, int(n), *map(float, stamps), tuple(compute[s])))
    return rows


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals, as sorted disjoint intervals."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(x for x in spans if x[1] > x[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _covered(merged: list[tuple[float, float]], a: float, b: float) -> float:
    """How much of [a, b] the sorted disjoint intervals `merged` cover."""
    i = max(0, bisect.bisect_right(merged, (a, a)) - 1)
    total = 0.0
    while i < len(merged) and merged[i][0] < b:
        total += max(0.0, min(b, merged[i][1]) - max(a, merged[i][0]))
        i += 1
    return total


def overhead(rows: list[StepTimes]) -> dict:
    """Each step's wall time, split so the parts add up (none counted twice, none negative): compute = some
    stage is computing; scheduler = the scheduler works while no stage computes; draft wait = the scheduler
    waits for proposals while no stage computes; wire = the rest (control-path hops, msgpack, link send/recv,
    stages applying events). Stage compute is taken wherever it falls, so a stage still computing during the
    next step's draft wait counts as compute there, not as waiting."""
    if not rows:
        return {"steps": 0}
    compute = _merge([span for st in rows for span in st.compute])
    busy = _merge(compute + [span for st in rows for span in st.scheduler_work()])
    waiting = _merge(busy + [(st.wait_start, st.wait_end) for st in rows])
    wall, comp, sched, wait, wire = [], [], [], [], []
    for st in rows:
        c, b, w = (_covered(m, st.start, st.end) for m in (compute, busy, waiting))
        wall.append(st.end - st.start)
        comp.append(c)
        sched.append(b - c)
        wait.append(w - b)
        wire.append(wall[-1] - w)
    total, n = sum(wall), len(rows)
    # start to next start of back-to-back steps: the step plus the scheduler's loop between steps (new requests,
    # cancellations, admission, stats), the beat a request actually sees
    periods = [b.start - a.start for a, b in pairwise(rows) if b.step == a.step + 1 and b.start - a.end < 0.05]
    return {
        "steps": n, "mean_step_ms": 1000 * total / n,
        "mean_period_ms": 1000 * statistics.fmean(periods) if periods else None, "mean_compute_ms": 1000 * sum(comp) / n,
        "mean_scheduler_ms": 1000 * sum(sched) / n, "mean_draft_wait_ms": 1000 * sum(wait) / n,
        "mean_wire_ms": 1000 * statistics.fmean(wire), "p50_wire_ms": 1000 * statistics.median(wire),
        "compute_share": sum(comp) / total, "scheduler_share": sum(sched) / total,
        "draft_wait_share": sum(wait) / total, "wire_share": sum(wire) / total,
    }


def stage_compute(rows: list[StepTimes], stages: int, average=statistics.fmean) -> list[float | None]:
    """Each stage's mean (or other `average`) forward time (ms) over the steps where it computed rows (an empty
    forward is ~0)."""
    out = []
    for k in range(stages):
        spans = [b - a for st in rows for a, b in st.compute[k : k + 1] if b - a > 1e-3]
        out.append(1000 * average(spans) if spans else None)
    return out


def draft_forwards(r, rcfg: RedisConfig) -> dict:
    """The draft's forwards, the draft workers' or the scheduler's own lookups (`draft-scheduler`): set against
    the step time, is the pipe draft-bound?"""
    spans = [item.decode().split(":") for key in r.scan_iter(rcfg.key("timings", "draft-*"))
             for item in r.lrange(key, 0, -1)]
    if not spans:
        return {"draft_forwards": 0}
    return {"draft_forwards": len(spans), "mean_draft_forward_ms": 1000 * statistics.fmean(float(s[1]) for s in spans),
            "mean_draft_rows": statistics.fmean(int(s[2]) for s in spans)}


def summarize(r, rcfg: RedisConfig, args: argparse.Namespace, layer_split: str) -> dict:
    rows = step_rows(r, rcfg, args.stages)
    return {
        "machine": machine(),
        "model": args.model, "stages": args.stages, "policy": args.policy, "layer_split": layer_split,
        **overhead(rows), "stage_compute_ms": stage_compute(rows, args.stages), **draft_forwards(r, rcfg),
        # medians: a decode step's, which a few long prompt steps do not move
        "p50_step_ms": 1000 * statistics.median(st.end - st.start for st in rows) if rows else None,
        "stage_compute_p50_ms": stage_compute(rows, args.stages, statistics.median),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wire_overhead")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", default="specpipe")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--layer-split", default=MEASURED, help="the stages' layer split (specpipe up --layer-split)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per stage and draft (0: cores shared)")
    p.add_argument("--numerics", default=DEFAULT_NUMERICS, choices=NUMERICS, help="the stages' kernels")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompts", default=None)
    p.add_argument("--redis-url", default=env("REDIS_URL"))
    p.add_argument("--master-port", type=int, default=29571)
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
