"""Per-step overhead of the wire against stage compute, on a real local cluster.

    python -m benchmarks.wire_overhead [--model smollm2-135m] [--stages 2] [--requests 8] [--concurrency 4]

Per pipeline step: wall = scheduler publishes StepMsg -> VerifyMsg back -> tokens published;
compute = the slowest stage's forward time in that step; scheduler = its own CPU time
(schedule, verify, draft I/O); wire = wall - compute - scheduler (Redis round trips,
msgpack, torch.distributed send/recv, waiting for the step record).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
import uuid
from collections import defaultdict

from shared.messages import RequestMsg
from shared.model_store import load_tokenizer, resolve_model
from shared.queue_client import collect, submit
from shared.redis_io import RedisConfig, alive, connect, ensure_redis, pipeline_components, stage_name
from specpipe.cluster import ClusterConfig, commands, delete_keys, stop_processes
from specpipe.prompts import encode_chat, read_prompts


def run(args: argparse.Namespace) -> dict:
    redis_proc = ensure_redis(args.redis_url)
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    cfg = ClusterConfig(args.model, "ngram", args.policy, args.stages, args.width, 1, 256, args.redis_url, prefix,
                        args.master_port)
    rcfg = RedisConfig(args.redis_url, prefix)
    r = connect(rcfg)
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, cmd in commands(cfg).items() if name != "gateway"]
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
        return summarize(r, rcfg, args)
    finally:
        stop_processes(procs)
        delete_keys(r, prefix)
        if redis_proc is not None:
            redis_proc.terminate()


def step_rows(r, rcfg: RedisConfig, stages: int, first_step: int = 1,
              last_step: int | None = None) -> list[tuple[float, float, float, int]]:
    """(wall, slowest stage's compute, scheduler's own time, rows) per step in [first_step, last_step]
    that every stage has reported, from the `timings:*` lists the scheduler and the stages push."""
    compute: dict[int, float] = defaultdict(float)
    reported: dict[int, int] = defaultdict(int)
    for k in range(stages):
        for item in r.lrange(rcfg.key("timings", stage_name(k)), 0, -1):
            step, secs = item.decode().split(":")
            compute[int(step)] = max(compute[int(step)], float(secs))
            reported[int(step)] += 1
    rows = []
    for item in r.lrange(rcfg.key("timings", "scheduler"), 0, -1):
        step, wall, own, n = item.decode().split(":")
        s = int(step)
        if s >= first_step and (last_step is None or s <= last_step) and reported[s] == stages:
            rows.append((float(wall), compute[s], float(own), int(n)))
    return rows


def overhead(rows: list[tuple[float, float, float, int]]) -> dict:
    """Per-step means and shares of a step's wall time: compute, scheduler, wire = wall - compute - scheduler."""
    if not rows:
        return {"steps": 0}
    wall = sum(w for w, _, _, _ in rows)
    comp = sum(c for _, c, _, _ in rows)
    own = sum(o for _, _, o, _ in rows)
    wire = [w - c - o for w, c, o, _ in rows]
    return {
        "steps": len(rows), "mean_step_ms": 1000 * wall / len(rows), "mean_compute_ms": 1000 * comp / len(rows),
        "mean_scheduler_ms": 1000 * own / len(rows), "mean_wire_ms": 1000 * statistics.fmean(wire),
        "p50_wire_ms": 1000 * statistics.median(wire),
        "wire_share": sum(wire) / wall, "scheduler_share": own / wall, "compute_share": comp / wall,
    }


def summarize(r, rcfg: RedisConfig, args: argparse.Namespace) -> dict:
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {__import__('os').cpu_count()} cores",
        "model": args.model, "stages": args.stages, "policy": args.policy,
        **overhead(step_rows(r, rcfg, args.stages)),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wire_overhead")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", default="specpipe")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompts", default=None)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
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
