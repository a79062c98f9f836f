"""The pipeline beat with nothing to compute: the services' control overhead per step.

    python -m benchmarks.beat [--stages 2,4,8] [--compute-ms 0] [--requests 1,16] [--policies pp,specpipe]
        [--schedulers lockstep,async] [--realtime-priority 0,10] [--ngram-in workers] [--tokens 48] [--out FILE]

For every (stage processes, policy, scheduler loop, concurrent requests), a cluster of null stages (stage_worker
--null-compute-ms S: no model, every forward takes S ms; tiny-random's shapes on the wire), the scheduler and,
under specpipe, the n-gram draft where `--ngram-in` puts it: by default one draft worker, where `specpipe up`
puts it with GPU stages, whose pace the null stages stand for (`scheduler`: looked up in the scheduler's loop, as
on a CPU host). The null stages answer every row with its own token, so the n-gram
draft's proposals are always accepted and specpipe keeps the pipe as full as it can. `requests` requests of
`tokens` new tokens go in at once. The scheduler loop is lockstep (each step scheduled after the last one's
verification) or async (--async-scheduling: scheduled while the stages compute the one before). With
--realtime-priority N (N > 0) the scheduler, the stages and any draft worker run under SCHED_FIFO at priority N:
each takes a core as soon as its input arrives, instead of queueing behind whatever else woke at the step's
boundary (needs CAP_SYS_NICE; a run where it was refused says so in the processes' logs, not here).

From the stages' timings, a step starts when the last of its stages starts computing it; the beat is the time
from one step's start to the next's over back-to-back steps, and the overhead is the beat minus the step's
longest forward: what a step costs beyond its compute (control-path hops, msgpack, the stage link, scheduling,
the draft wait, wherever they are not hidden behind a forward). p50 and p99 are over full steps (every stage had
rows); the mean is over every step (plain PP with one request has no full step: one stage computes at a time,
and the next step goes out while it still does, so only the mean means anything there). A lockstep run also
reports the overhead as sessions before measured it, from the scheduler loop's step starts
(`scheduler_p50_ms`), and where a lockstep beat goes (`parts`, benchmarks.wire_overhead's stamps): under async
scheduling the loop's stamps no longer bound a step.

Prints a table (p50 / p99 overhead in ms) and, last, `beat overhead p50 X ms p99 Y ms` for 4 stage processes,
specpipe, 16 requests (the configuration issue 15's goal names), the last such run (async scheduling and the
last priority asked for, where they were run), on the machine named in the header.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import uuid
from itertools import pairwise, product

from benchmarks.provenance import machine
from benchmarks.wire_overhead import step_rows
from shared.environment import env
from shared.model_store import resolve_model
from shared.transport.queue_client import collect, submit
from shared.transport.redis_io import RedisConfig, alive, connect, ensure_redis, pipeline_components, stage_name
from shared.wire.messages import RequestMsg
from specpipe.cluster import NGRAM_PLACES, ClusterConfig, delete_keys, pipeline_commands, stop_processes

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]  # any tokens: the null stages' targets repeat the last one


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(args: argparse.Namespace, stages: int, policy: str, loop: str, requests: int, priority: int = 0) -> dict:
    prefix = f"beat-{uuid.uuid4().hex[:6]}"
    cfg = ClusterConfig(model=str(resolve_model(args.model)), draft="ngram", policy=policy, stages=stages,
                        redis_url=args.redis_url, prefix=prefix, threads=1, device="cpu",
                        async_scheduling=loop == "async", realtime_priority=priority, ngram_in=args.ngram_in)
    commands = pipeline_commands(cfg)
    for k in range(stages):
        commands[stage_name(k)] += ["--null-compute-ms", str(args.compute_ms)]
    rcfg = RedisConfig(args.redis_url, prefix)
    r = connect(rcfg)
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for cmd in commands.values()]
    try:
        names = [*pipeline_components(stages), *(f"draft-{i}" for i in range(cfg.draft_workers))]
        while not all(alive(r, rcfg, n) for n in names):
            time.sleep(0.2)
        first_step = _warm_up(r, rcfg)
        for i in range(requests):
            submit(r, rcfg, RequestMsg(f"b{i}", PROMPT, args.tokens))
        for i in range(requests):
            collect(r, rcfg, f"b{i}", timeout_s=300)
        time.sleep(2.5)  # stages flush their timings when idle
        rows = step_rows(r, rcfg, stages, first_step=first_step)
    finally:
        stop_processes(procs)
        delete_keys(r, prefix)
    chain = [(a, b) for a, b in pairwise(rows) if b.step == a.step + 1]
    # p50 / p99 over full steps (every stage had rows: a step of plain PP with one request has one busy stage, and
    # its successor starts at once while that stage still computes); the mean over every step of the run
    full = [(a, b) for a, b in chain if min(end - start for start, end in a.compute) >= args.compute_ms / 2000]
    overhead = [1000 * (began(b) - began(a) - compute(a)) for a, b in full]
    run = {"stages": stages, "policy": policy, "scheduler": loop, "realtime_priority": priority,
           "requests": requests, "steps": len(chain),
           "full_steps": len(full), "tokens": requests * args.tokens,
           "p50_ms": percentile(overhead, 0.5) if overhead else None,
           "p99_ms": percentile(overhead, 0.99) if overhead else None,
           "mean_ms": 1000 * statistics.fmean([began(b) - began(a) - compute(a) for a, b in chain]) if chain else None}
    if loop == "lockstep":
        by_loop = [1000 * (b.start - a.start - compute(a)) for a, b in full]
        run |= {"scheduler_p50_ms": percentile(by_loop, 0.5) if by_loop else None,
                "scheduler_p99_ms": percentile(by_loop, 0.99) if by_loop else None,
                "parts_p50_ms": parts(full, 0.5), "parts_p99_ms": parts(full, 0.99)}
    return run


def began(step) -> float:
    """When the step started: its last stage to start computing started."""
    return max(start for start, _ in step.compute)


def compute(step) -> float:
    """The longest forward of any stage in this step (s)."""
    return max(end - start for start, end in step.compute)


def parts(pairs: list, q: float) -> dict[str, float]:
    """Where a beat goes, the q-quantile of each part (ms): the scheduler's draft wait, its schedule() and send,
    the delivery (the step sent -> the last stage to start computing starts), the stages' round trip beyond the
    compute (sent -> verification back, minus the step's longest forward), update_from_output, and the rest of
    the loop (the shadow's Redis work that outlasted the compute, telemetry) until the next step starts."""
    spans = {
        "draft_wait": [a.wait_end - a.wait_start for a, _ in pairs],
        "schedule_send": [a.published - a.wait_end + a.wait_start - a.start for a, _ in pairs],
        "delivery": [max(c[0] for c in a.compute) - a.published for a, _ in pairs],
        "stages_beyond_compute": [a.verified - a.published - compute(a) for a, _ in pairs],
        "update": [a.end - a.verified for a, _ in pairs],
        "loop": [b.start - a.end for a, b in pairs],
    }
    return {name: round(1000 * percentile(values, q), 3) for name, values in spans.items() if values}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _warm_up(r, rcfg: RedisConfig) -> int:
    """One short request first (a fresh cluster's first steps are slow); returns the first step after it."""
    submit(r, rcfg, RequestMsg("warm", PROMPT, 4))
    collect(r, rcfg, "warm", timeout_s=300)
    time.sleep(0.5)
    steps = r.lrange(rcfg.key("timings", "scheduler"), -1, -1)
    return int(steps[0].decode().split(":")[0]) + 1 if steps else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.beat", description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="2,4,8")
    p.add_argument("--policies", default="pp,specpipe")
    p.add_argument("--schedulers", default="lockstep,async",
                   help="scheduler loops: lockstep (each step after the last verification), async (--async-scheduling)")
    p.add_argument("--realtime-priority", default="0",
                   help="SCHED_FIFO priorities of the beat's processes, one run each (0: normal scheduling)")
    p.add_argument("--requests", default="1,16", help="concurrent requests per run")
    p.add_argument("--compute-ms", type=float, default=0.0, help="each forward's fixed time (0: none)")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    p.add_argument("--ngram-in", choices=NGRAM_PLACES, default="workers",
                   help="where specpipe's n-gram draft is looked up (specpipe up --ngram-in): workers, as with GPU "
                        "stages (the default), or the scheduler, as on a CPU host")
    p.add_argument("--model", default="tiny-random", help="whose shapes cross the wire (no weights are read)")
    p.add_argument("--redis-url", default=env("REDIS_URL"))
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    redis_proc = ensure_redis(args.redis_url)
    runs = []
    try:
        for stages in _ints(args.stages):
            for policy in args.policies.split(","):
                for loop, priority in product(args.schedulers.split(","), _ints(args.realtime_priority)):
                    for requests in _ints(args.requests):
                        runs.append(measure(args, stages, policy, loop, requests, priority))
                        print(_line(runs[-1]), flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
    result = {"machine": machine(), "compute_ms": args.compute_ms, "tokens": args.tokens, "ngram_in": args.ngram_in,
              "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"# {result['machine']}; null stages ({args.compute_ms:g} ms compute), control path over TCP, "
          f"the n-gram draft in the {args.ngram_in}")
    goal = [x for x in runs if (x["stages"], x["policy"], x["requests"]) == (4, "specpipe", 16)]
    if goal:
        best = goal[-1]  # async where it ran (the last loop asked for), at the last priority asked for
        print(f"# the line below: {best['scheduler']} scheduling, realtime priority {best['realtime_priority']}")
        print(f"beat overhead p50 {best['p50_ms']:.2f} ms p99 {best['p99_ms']:.2f} ms")
    return 0


def _ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",")]


def _line(run: dict) -> str:
    rt = f" rt {run['realtime_priority']}" if run["realtime_priority"] else ""
    line = (f"{run['stages']} stages {run['policy']:8s} {run['scheduler']:8s}{rt} {run['requests']:3d} requests: "
            f"{run['steps']} steps ({run['full_steps']} full), overhead p50 {_ms(run['p50_ms'])} "
            f"p99 {_ms(run['p99_ms'])} mean {_ms(run['mean_ms'])}")
    if "parts_p50_ms" in run:
        line += (f"; by the scheduler's loop p50 {_ms(run['scheduler_p50_ms'])} p99 {_ms(run['scheduler_p99_ms'])}; "
                 f"p50 parts {run['parts_p50_ms']}; p99 parts {run['parts_p99_ms']}")
    return line


if __name__ == "__main__":
    raise SystemExit(main())
