"""Two stage processes on one host share its memory bandwidth: how much slower each runs beside the other.

    python -m benchmarks.bandwidth [--model smollm2-135m] [--numerics fast,compiled] [--rows 1,2] [--steps 40]
        [--context 600] [--repeats 3] [--out results.json]

SpecPipe keeps every stage busy at once; plain PP runs one stage at a time. Where the stages are processes of one
host (this benchmark's cores, not the one-device-per-stage deployment), a step of SpecPipe is the slowest stage's
forward *beside the others*, and a token of PP is the sum of the stages' forwards *alone*. So it measures:

- a probe of the host: a streaming read of 256 MB (GB/s) and a small in-cache matmul, on one core alone and on
  both cores at once. A forward that reads its weights at the speed of the first is slowed by what the cores
  share; the second is not;
- the stages of a 2-stage split of `model`, each a pinned process with one torch thread: a decode step of `rows`
  rows after a `context`-token prompt (the last stage's LM head included), p50 over `steps`, each stage alone
  and both at once, for each numerics mode.

From these, what SpecPipe must accept per step, with steps of `rows` rows, to decode `target`x PP's tokens per
second with one request: tokens/step >= target * (slowest stage beside the other) / (sum of the stages alone at one
row: PP sends one), and, where each stage has a device of its own (nothing shared: beside = alone), target *
(slowest stage alone) / (sum of the one-row stages alone). PP yields 1 / stages tokens per step; SpecPipe at most 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time

import torch

from benchmarks.provenance import machine
from shared.model_store import resolve_model
from shared.types.config import NUMERICS, ModelArch

STAGES = 2  # one stage per core of a 2-core host
PROBE_BYTES = 256 << 20


def _pin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _probe(kind: str, core: int, seconds: float, start, out) -> None:
    """Rate of `kind` on `core` for `seconds`, after `start`: GB/s streamed, or rounds of 500 in-cache 64 x 64
    matmuls per second."""
    _pin(core)
    if kind == "stream":
        data = torch.ones(PROBE_BYTES // 4)
        work, unit = data.sum, PROBE_BYTES / 1e9
    else:
        a, b = torch.randn(64, 64), torch.randn(64, 64)
        work, unit = (lambda: [a @ b for _ in range(500)]), 1.0
    work()
    start.wait()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        work()
        n += 1
    out.put(n * unit / (time.perf_counter() - t))


def _stage(model: str, numerics: str, rank: int, rows: int, steps: int, context: int, core: int, start, out) -> None:
    """p50 seconds of this stage's decode step of `rows` rows (its LM head too, on the last stage), after `start`."""
    from shared.compute.runner import load_stage
    from shared.compute.split_measure import StageClock

    _pin(core)
    model_dir = resolve_model(model)
    arch = ModelArch.from_model_dir(model_dir)
    runner = load_stage(model_dir, arch, rank, STAGES, numerics=numerics)
    with torch.no_grad():
        clock = StageClock(runner, arch, rank == 0, rank == STAGES - 1, context, rows, steps)
        start.wait()
        clock.time_steps(steps)
    out.put((rank, statistics.median(clock.times)))


def _run(target, jobs: list[tuple]) -> list:
    """Start one process per job (its args), let them all begin together, return what each put; a process that
    dies first is a RuntimeError, not a wait."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, out)) for args in jobs]
    for p in procs:
        p.start()
    results = []
    try:
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a {target.__name__} process died: exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            if len(results) < len(procs):
                p.kill()
            p.join()
    return results


def probe(repeats: int = 3, seconds: float = 2.0) -> dict:
    """Each rate alone and beside, the median of `repeats` tries (a shared host's speed drifts)."""
    out = {}
    for kind in ("stream", "matmul"):
        alone = statistics.median(_run(_probe, [(kind, 0, seconds)])[0] for _ in range(repeats))
        both = [sorted(_run(_probe, [(kind, 0, seconds), (kind, 1, seconds)])) for _ in range(repeats)]
        beside = [statistics.median(b[i] for b in both) for i in range(2)]  # the slower core's, the faster's
        out[kind] = {"alone": alone, "beside": beside, "slowdown": alone / statistics.mean(beside)}
    return out


def stages(model: str, numerics: str, rows: int, steps: int, context: int, repeats: int = 1) -> dict:
    """Each stage alone, then all beside each other, taken in turn `repeats` times; each stage's time is the median
    of its tries (a shared host's speed drifts within minutes: tries in turn see the same drift)."""
    tries: dict[str, list[dict[int, float]]] = {"alone": [], "beside": []}
    for _ in range(repeats):
        tries["alone"].append(dict(r for rank in range(STAGES)
                                   for r in _run(_stage, [(model, numerics, rank, rows, steps, context, 0)])))
        tries["beside"].append(dict(_run(_stage, [(model, numerics, rank, rows, steps, context, rank)
                                                  for rank in range(STAGES)])))
    alone, beside = ({k: statistics.median(t[k] for t in tries[kind]) for k in range(STAGES)}
                     for kind in ("alone", "beside"))
    return {"numerics": numerics, "rows": rows, "alone_s": [alone[k] for k in range(STAGES)],
            "beside_s": [beside[k] for k in range(STAGES)], "pp_token_s": sum(alone.values()),
            "specpipe_step_s": max(beside.values())}


def needs(timings: list[dict]) -> None:
    """Set on each of one numerics mode's stage timings (`stages`) the tokens per step SpecPipe needs, with steps of
    its rows, to decode at PP's rate: on this host (its step: the slowest stage beside the other) and with a device
    per stage (alone). PP sends one row: its token is the fewest-rows timing's stages alone, one after another."""
    pp_token = min(timings, key=lambda s: s["rows"])["pp_token_s"]
    for s in timings:
        s["pp_one_row_token_s"] = pp_token
        s["tokens_per_step_for_1x"] = s["specpipe_step_s"] / pp_token
        s["tokens_per_step_for_1x_device_per_stage"] = max(s["alone_s"]) / pp_token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bandwidth", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--numerics", default="fast,compiled", help=f"comma-separated, of {', '.join(NUMERICS)}")
    p.add_argument("--rows", default="1,2", help="rows per decode step, comma-separated")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3, help="alone and beside taken in turn this many times")
    p.add_argument("--target", type=float, default=1.25, help="SpecPipe's decode rate over PP's to reach")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    modes = a.numerics.split(",")
    if not set(modes) <= set(NUMERICS):
        p.error(f"--numerics takes {', '.join(NUMERICS)}")
    if (os.cpu_count() or 1) < STAGES:
        p.error(f"needs {STAGES} cores")
    result = {"machine": machine(), "model": a.model, "context": a.context, "steps": a.steps, "repeats": a.repeats,
              "target": a.target, "probe": probe(), "stages": []}
    for k, v in result["probe"].items():
        print(f"{k}: alone {v['alone']:.1f}, beside {' / '.join(f'{x:.1f}' for x in v['beside'])}, "
              f"each {v['slowdown']:.2f}x slower beside", flush=True)
    for numerics in modes:
        timings = [stages(a.model, numerics, rows, a.steps, a.context, a.repeats) for rows in
                   sorted(int(r) for r in a.rows.split(","))]
        needs(timings)
        result["stages"] += timings
        for s in timings:
            ms = lambda xs: " + ".join(f"{1e3 * x:.1f}" for x in xs)
            print(f"{numerics}, {s['rows']} row(s): stages alone {ms(s['alone_s'])} ms, beside {ms(s['beside_s'])} "
                  f"ms; SpecPipe needs {a.target * s['tokens_per_step_for_1x']:.2f} tokens/step for {a.target}x PP "
                  f"here, {a.target * s['tokens_per_step_for_1x_device_per_stage']:.2f} with a device per stage",
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
