"""One request at a time on the real services, pp and specpipe taking turns: a ratio that a noisy host moves less.

    python -m benchmarks.interleaved [--prompt-file sum.jsonl] [--prompts 5] [--tokens 64] [--rounds 2]
        [--arms pp,specpipe] [--numerics fast] [--out results.json]

benchmarks.serving's section 1 serves every prompt on a pp cluster, then every prompt on a specpipe cluster: on
a shared 2-core host whose speed drifts by 10-20% within minutes, the two halves can run at different speeds.
Here both clusters (smollm2-135m, 2 stage processes, the n-gram draft; section 1's settings) are up side by
side, and each prompt goes to one, then the other, for `rounds` rounds: both see the same stretch of the
host's time. Per request, TBT = (last token's arrival - first's) / (tokens - 1), as section 1. Prints each
arm's mean TBT over the requests and the decode rate (the first arm's mean TBT over the second's), and checks
that both gave the same tokens for every request. It also reads every process's CPU seconds (/proc) around each
request: CPU ms per pipeline step by process. Where the stages fill every core (SpecPipe on a 2-core host), the
scheduler's and the draft worker's share is taken from a stage; PP leaves a core idle for them.

An arm is a policy, or `specpipe-async`: specpipe under the scheduler's --async-scheduling; `specpipe-r2`,
specpipe with --refill-depth 2; `specpipe-shared`, specpipe whose n-gram draft keeps a table across requests
(--ngram-shared); `-worker`, specpipe whose n-gram draft is looked up in a draft worker process (--ngram-in
workers), not the scheduler's. A shared table holds the requests served before: compare it over one round of
distinct prompts (`--rounds 1`), or a prompt's second round drafts from its first.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import replace

from benchmarks.provenance import machine
from benchmarks.serving import FAILURES, ServingConfig, bench_prompts, sequential
from benchmarks.serving_cluster import ClusterPool, ClusterSpec
from shared.types.config import DEFAULT_NUMERICS, NUMERICS
from specpipe.cluster import AUTO

ARMS = ("pp", "specpipe", "specpipe-async")
# an arm; a specpipe one may name its refill depth, and `-shared` for the n-gram draft's table across requests; any
# may end in `@A+B`, its stages' layer counts (--layer-split A,B)
ARM = re.compile(r"(?:pp|specpipe(-async)?(?:-r(\d+))?(-shared)?(-worker)?)(?:@(\d+(?:\+\d+)+))?")
SHARED_TOKENS = 1 << 16  # a `-shared` arm's table


def arm_spec(cfg: ServingConfig, arm: str) -> ClusterSpec:
    """The cluster of an arm: a policy, `-async` for --async-scheduling, `-rN` for --refill-depth N, `-shared` for
    --ngram-shared SHARED_TOKENS, `@A+B` for --layer-split A,B."""
    asynchronous, refill, shared, worker, split = ARM.fullmatch(arm).groups()
    spec = replace(cfg.spec(re.split("[-@]", arm)[0]), async_scheduling=bool(asynchronous),
                   ngram_shared=SHARED_TOKENS if shared else 0,
                   ngram_in="workers" if worker else AUTO)
    if split:
        spec = replace(spec, layer_split=split.replace("+", ","))
    return spec if refill is None else replace(spec, refill_depth=int(refill))


def run(cfg: ServingConfig, rounds: int, arms: tuple[str, str] = ("pp", "specpipe")) -> dict:
    prompts = bench_prompts(cfg, cfg.model, cfg.prompts_per_file)
    tbt: dict[str, list[float]] = {a: [] for a in arms}
    outputs: dict[str, list[list[int]]] = {a: [] for a in arms}
    steps, cpu = dict.fromkeys(arms, 0), {a: {} for a in arms}  # pipeline steps; CPU seconds by process
    out = {"machine": machine(), "model": cfg.model, "draft": cfg.draft, "stages": cfg.stages,
           "prompt_files": list(cfg.prompt_files), "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
           "numerics": cfg.numerics, "rounds": rounds, "arms": list(arms), "error": None}
    pool = ClusterPool(cfg.request_timeout_s)
    try:
        clusters = {a: pool.get(arm_spec(cfg, a), prompts[0]["ids"]) for a in arms}
        for r in range(rounds):
            for i, prompt in enumerate(prompts):
                for policy, cluster in clusters.items():
                    before = cluster.cpu_seconds()
                    served = sequential(cfg, cluster, [prompt], tag=f"turn-{r}-{i}")
                    _add_cpu(cpu[policy], before, cluster.cpu_seconds())
                    steps[policy] += served["steps"]
                    tbt[policy].append(served["tbt_s"]["mean"])
                    outputs[policy] += [d["output_ids"] for d in served["requests_detail"]]
    except FAILURES as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        pool.close()
    means = {a: statistics.mean(v) if v else None for a, v in tbt.items()}
    first, second = arms
    out.update(tbt_s=tbt, mean_tbt_s=means, identical=outputs[first] == outputs[second],
               decode_rate=means[first] / means[second] if all(means.values()) else None, steps=steps,
               cpu_ms_per_step={a: {name: 1000 * s / steps[a] for name, s in cpu[a].items()} if steps[a] else {}
                                for a in arms})
    return out


def _add_cpu(total: dict[str, float], before: dict[str, float | None], after: dict[str, float | None]) -> None:
    """Each process's CPU seconds between the two readings, added up (a process gone by then is left out)."""
    for name, seconds in after.items():
        if seconds is not None and before.get(name) is not None:
            total[name] = total.get(name, 0.0) + seconds - before[name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interleaved", description=__doc__.split("\n")[0])
    p.add_argument("--prompt-file", default="sum.jsonl")
    p.add_argument("--prompts", type=int, default=5, help="the first K prompts of the file")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--arms", default="pp,specpipe",
                   help=f"the two clusters, each one of {', '.join(ARMS)}, a specpipe one with -rN for a refill depth "
                        "of N (specpipe-r2) and -shared for the n-gram table across requests (specpipe-r2-shared), "
                        "any with @A+B for its stages' layer counts (specpipe@18+12); "
                        "the decode rate is the first's TBT over the second's")
    p.add_argument("--numerics", choices=NUMERICS, default=DEFAULT_NUMERICS, help="both clusters' kernels")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    arms = tuple(a.arms.split(","))
    if len(arms) != 2 or len(set(arms)) != 2 or not all(ARM.fullmatch(arm) for arm in arms):
        p.error(f"--arms takes two different arms, of {', '.join(ARMS)} (a specpipe one with -rN, -shared; @A+B)")
    cfg = ServingConfig(prompt_files=(a.prompt_file,), prompts_per_file=a.prompts, max_new_tokens=a.tokens,
                        numerics=a.numerics)
    out = run(cfg, a.rounds, arms)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    if out["error"]:
        print(out["error"], file=sys.stderr)
        return 1
    ms = {k: round(1000 * v, 1) for k, v in out["mean_tbt_s"].items()}
    tbts = ", ".join(f"{arm} {ms[arm]} ms" for arm in arms)
    print(f"{out['machine']}: mean TBT {tbts} over {len(out['tbt_s'][arms[0]])} requests each; decode rate "
          f"{out['decode_rate']:.3f}x; identical {out['identical']}")
    for arm, by_process in out["cpu_ms_per_step"].items():
        print(f"  {arm}: CPU ms per step ({out['steps'][arm]} steps): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in by_process.items()))
    return 0 if out["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
