"""The real services under test: single requests, the Hugging Face baseline, load, resources.

    python -m benchmarks.serving [--quick | --full] [--sections 1,2,3,4] [--prompts-per-file K]
        [--out results.json] [--markdown report.md]

Every number comes from one run on this machine, side by side:

1. `single_request`: the distributed services (scheduler, N stage processes linked over TCP, one draft
   worker for specpipe; started with specpipe.cluster's command lines, no gateway) serve the prompts one at
   a time, policy pp, then specpipe, each on its own fresh cluster. Requests go straight into the Redis
   `requests` stream and tokens are timestamped as they come out of `out:{request}` (benchmarks/
   serving_cluster.py): TTFT = first token's arrival - submit; TBT per request = (last token's arrival -
   first token's arrival) / (tokens - 1), tokens arriving in one message counting at its arrival; the gaps
   between consecutive tokens over all requests; tokens per pipeline step from the scheduler's step counter
   (its `timings:scheduler` list) and draft acceptance from its `stats` snapshot. pp and specpipe must emit
   identical tokens.
2. `hf_baseline`: transformers `generate()` (target alone, and assisted by a draft model) and SpecPipe's
   in-process executor, in this process, on the same prompts, beside the services' numbers from (1);
   every output is compared token for token with plain `generate()`.
3. `load`: many requests through a pp and a specpipe cluster (section 1's, when `run_all` finds the same
   model and draft): fixed concurrency (closed loop) and Poisson arrivals (open loop, seeded); throughput
   in tokens per step and per second, TTFT and TBT; every request's tokens are checked against plain
   decoding of its prompt alone (in-process pp, one stage).
4. `resources`: peak RSS (VmHWM) of every process of the clusters above against the weight bytes each stage
   holds, and benchmarks.wire_overhead's split of a step into compute / scheduler / wire.

Each function takes a frozen `ServingConfig` and returns a JSON-serializable dict; a dead process or a
timeout ends that section with `"error"` set (and its clusters stopped), never a hang.
`benchmarks.serving_report.markdown(results)` renders the BENCHMARKS.md sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from benchmarks.hf_baseline import hf_generate, inprocess
from benchmarks.provenance import machine
from benchmarks.serving_cluster import (
    ClusterError,
    ClusterPool,
    ClusterSpec,
    ServiceCluster,
    StreamReader,
    Trace,
    stage_weight_bytes,
)
from benchmarks.stats import dist
from shared.environment import DEFAULTS
from shared.model_store import load_tokenizer, resolve_model
from shared.types.config import DEFAULT_NUMERICS
from shared.types.errors import SpecPipeError
from specpipe.prompts import encode_chat, read_prompts

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
WORKLOADS = ("mt_bench.jsonl", "alpaca.jsonl", "sum.jsonl")
FAILURES = (ClusterError, SpecPipeError, OSError, redis.RedisError)


@dataclass(frozen=True)
class ServingConfig:
    model: str = "smollm2-135m"  # the target of sections 1 and 2
    draft: str = "ngram"  # SpecPipe's draft: a model name or "ngram"
    draft_dtype: str = "float32"  # the services' draft worker (lossless either way: the fp32 target verifies)
    assistant: str | None = None  # HF assisted generation's draft model; None: `draft` (the target if ngram)
    prompts_dir: str = str(PROMPTS_DIR)
    prompt_files: tuple[str, ...] = WORKLOADS
    prompts_per_file: int = 1  # sections 1 and 2: the first K prompts of each file (first turn, chat template)
    max_new_tokens: int = 32
    stages: int = 2
    width: int = 4
    refill_depth: int | None = None  # None: the scheduler's default (shared.types.config.default_refill_depth)
    inprocess_stages: tuple[int, ...] = (2,)  # section 2: the in-process executor's stage counts
    load_model: str | None = None  # section 3's target; None: `model`
    load_draft: str | None = None  # None: `draft`
    load_files: tuple[str, ...] | None = None  # section 3's prompt files; None: `prompt_files`
    load_prompts: int = 8  # distinct prompts, taken round robin from the files and cycled
    load_max_new_tokens: int = 16
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests_per_point: int = 16  # requests per concurrency point (at least the concurrency)
    rates: tuple[float, ...] = (1.0, 4.0)  # Poisson arrival rates, requests per second
    poisson_requests: int = 16  # requests per rate
    seed: int = 0
    threads: int | None = None  # torch threads per cluster process; None: specpipe.cluster's share of the cores
    hf_threads: int | None = None  # torch threads in this process (HF, in-process); None: one per core
    redis_url: str = DEFAULTS["REDIS_URL"]
    start_timeout_s: float = 300.0
    request_timeout_s: float = 900.0  # a whole sequential run or load point
    log_dir: str | None = None
    numerics: str = DEFAULT_NUMERICS  # the services' and the in-process executor's kernels

    @property
    def hf_assistant(self) -> str:
        return self.assistant or (self.model if self.draft == "ngram" else self.draft)

    def spec(self, policy: str, load: bool = False) -> ClusterSpec:
        model = self.load_model or self.model if load else self.model
        draft = self.load_draft or self.draft if load else self.draft
        return ClusterSpec(model=model, draft=draft, policy=policy, stages=self.stages, width=self.width,
                           refill_depth=self.refill_depth, threads=self.threads, redis_url=self.redis_url,
                           start_timeout_s=self.start_timeout_s, log_dir=self.log_dir, draft_dtype=self.draft_dtype,
                           numerics=self.numerics)


def quick_config() -> ServingConfig:
    """All four sections in a few minutes: smollm2-135m, n-gram draft (HF assists with smollm2 itself), short
    requests, the load sweep on the short-prompt workloads only, one torch thread in this process (a
    multi-threaded in-process run slows down several-fold when another job shares the cores)."""
    return ServingConfig(max_new_tokens=24, load_files=("mt_bench.jsonl", "alpaca.jsonl"), load_prompts=4,
                         load_max_new_tokens=12, requests_per_point=4, rates=(0.5, 2.0), poisson_requests=6,
                         hf_threads=1)


def full_config(prompts_per_file: int = 1) -> ServingConfig:
    """The report: the Qwen2.5-Coder pair (1.5B target, 0.5B draft in bf16, as docker-compose deploys it) for
    sections 1-2, 128 new tokens; smollm2-135m with the n-gram draft for the load sweep (section 3) so that it
    stays tractable."""
    return ServingConfig(model="qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b", draft_dtype="bfloat16",
                         prompts_per_file=prompts_per_file,
                         max_new_tokens=128, load_model="smollm2-135m", load_draft="ngram", load_prompts=12,
                         load_max_new_tokens=32, requests_per_point=16, rates=(0.5, 1.0, 2.0), poisson_requests=24,
                         request_timeout_s=1800.0)


# ---- prompts ------------------------------------------------------------------------------------------------
def bench_prompts(cfg: ServingConfig, model: str, per_file: int, total: int | None = None,
                  files: tuple[str, ...] | None = None) -> list[dict]:
    """[{"file", "id", "ids"}]: the first `per_file` prompts of each file (default `cfg.prompt_files`),
    interleaved round robin (first turn through the model's chat template), cut to `total`."""
    tokenizer = load_tokenizer(resolve_model(model))
    by_file = [[{"file": Path(f).stem, "id": p.prompt_id, "ids": encode_chat(tokenizer, p.text)}
                for p in read_prompts(Path(cfg.prompts_dir) / f, per_file)] for f in files or cfg.prompt_files]
    out = [p for group in itertools.zip_longest(*by_file) for p in group if p is not None]
    return out[:total] if total else out


def _meta(prompts: list[dict]) -> list[dict]:
    return [{"file": p["file"], "id": p["id"], "prompt_tokens": len(p["ids"])} for p in prompts]


def _first_diff(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(reference: list[list[int]], runs: dict[str, list[list[int]]], prompts: list[dict]) -> dict:
    """Token-for-token comparison of every run's outputs with the reference's; mismatches name the prompt."""
    mismatches = []
    for label, outputs in runs.items():
        for k, (p, ref) in enumerate(zip(prompts, reference)):
            out = outputs[k] if k < len(outputs) else []  # a run that stopped early misses outputs
            i = _first_diff(ref, out)
            if i is not None:
                mismatches.append({"run": label, "prompt": f"{p['file']}#{p['id']}", "first_diff": i,
                                   "tokens": [len(ref), len(out)]})
    return {"identical": not mismatches, "mismatches": mismatches}


# ---- section 1 ----------------------------------------------------------------------------------------------
def _latency(traces: list[Trace]) -> dict:
    failed = [t for t in traces if not t.finished or t.error]
    return {"requests": len(traces), "tokens": sum(len(t.tokens) for t in traces), "failed": len(failed),
            "errors": [f"{t.request_id}: {t.error or t.finish_reason}" for t in failed][:5],
            "ttft_s": dist([t.ttft for t in traces if t.ttft is not None]),
            "tbt_s": dist([t.tbt for t in traces if t.tbt is not None]),
            "gap_s": dist([g for t in traces for g in t.gaps])}


def _cluster_info(cluster: ServiceCluster, first_step: int, last_step: int) -> dict:
    """Start-up time, threads, peak RSS per process so far, and the wire split of the steps measured here."""
    return {"policy": cluster.spec.policy, "model": cluster.spec.model, "stages": cluster.spec.stages,
            "prefix": cluster.prefix, "threads": cluster.threads, "start_s": cluster.start_s,
            "peak_rss_bytes": cluster.peak_memory(),
            "steps": [first_step + 1, last_step], "wire": cluster.wire(first_step + 1, last_step)}


@contextmanager
def _clusters(cfg: ServingConfig, pool: ClusterPool | None):
    """The caller's pool (left running), or a private one stopped at the end; every cluster is stopped
    on a failure, so that a hung or half-dead cluster never serves the next section."""
    own = pool is None
    pool = pool or ClusterPool(cfg.request_timeout_s)
    try:
        yield pool
    except BaseException:
        pool.close()
        raise
    finally:
        if own:
            pool.close()


def sequential(cfg: ServingConfig, cluster: ServiceCluster, prompts: list[dict], tag: str = "single") -> dict:
    """The prompts one at a time on `cluster` (request ids `{policy}-{tag}-{i}`: a tag new to the cluster)."""
    policy, reader = cluster.spec.policy, StreamReader(cluster, cfg.request_timeout_s)
    base, before = cluster.wait_step(cluster.last_step()), cluster.stats(time.time())
    traces = [reader.run_one(f"{policy}-{tag}-{i}", i, p["ids"], cfg.max_new_tokens) for i, p in enumerate(prompts)]
    end = cluster.wait_step(max((t.steps[-1] for t in traces if t.steps), default=base), stages=True)
    after = cluster.stats(time.time())
    out = _latency(traces)
    decode_steps = sum(t.steps[-1] - t.steps[0] for t in traces if t.steps)
    busy = sum(t.e2e for t in traces if t.e2e is not None)
    out.update(
        policy=policy, steps=end - base, tokens_per_step=out["tokens"] / (end - base) if end > base else None,
        decode_tokens_per_step=sum(len(t.tokens) - 1 for t in traces) / decode_steps if decode_steps else None,
        e2e_s=busy, tokens_per_s=out["tokens"] / busy if busy else None,
        accepted=(after.accepted - before.accepted) if after and before else None,
        draft_tokens=(after.draft_tokens - before.draft_tokens) if after and before else None,
        requests_detail=[t.summary() for t in traces], cluster=_cluster_info(cluster, base, end))
    return out


def single_request(cfg: ServingConfig, pool: ClusterPool | None = None) -> dict:
    """Section 1: pp and specpipe through the real services, one request at a time (see the module doc)."""
    prompts = bench_prompts(cfg, cfg.model, cfg.prompts_per_file)
    out = {"section": "single_request", "machine": machine(), "model": cfg.model, "draft": cfg.draft,
           "draft_dtype": cfg.draft_dtype,
           "stages": cfg.stages, "width": cfg.width, "max_new_tokens": cfg.max_new_tokens, "prompts": _meta(prompts),
           "measured_at": "redis queue (RequestMsg XADD -> TokensMsg XREAD), no HTTP", "policies": {}, "error": None}
    try:
        with _clusters(cfg, pool) as clusters:
            for policy in ("pp", "specpipe"):
                cluster = clusters.get(cfg.spec(policy), prompts[0]["ids"])
                out["policies"][policy] = sequential(cfg, cluster, prompts)
                if cfg.spec(policy) != cfg.spec(policy, load=True):
                    clusters.release(cfg.spec(policy))  # one big-model cluster in memory at a time
    except FAILURES as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    outputs = {p: [r["output_ids"] for r in v["requests_detail"]] for p, v in out["policies"].items()}
    if len(outputs) == 2:
        out.update(compare(outputs["pp"], {"specpipe": outputs["specpipe"]}, prompts))
    else:
        out.update(identical=False, mismatches=[])
    return out


# ---- section 2 ----------------------------------------------------------------------------------------------
def hf_baseline(cfg: ServingConfig, services: dict | None = None) -> dict:
    """Section 2: HF generate / assisted generate / in-process executor beside the services' run from
    section 1 (`services`; run here when not given), all compared with plain `generate()` token for token."""
    prompts = bench_prompts(cfg, cfg.model, cfg.prompts_per_file)
    services = services if services is not None else single_request(cfg)
    out = {"section": "hf_baseline", "machine": machine(), "model": cfg.model, "draft": cfg.draft,
           "draft_dtype": cfg.draft_dtype,
           "assistant": cfg.hf_assistant, "assistant_is_target": cfg.hf_assistant == cfg.model,
           "max_new_tokens": cfg.max_new_tokens, "prompts": _meta(prompts), "runs": {}, "error": None}
    ids = [p["ids"] for p in prompts]
    try:
        for run in hf_generate(cfg.model, cfg.hf_assistant, ids, cfg.max_new_tokens, cfg.hf_threads):
            out["runs"][run["label"]] = run
        for n in cfg.inprocess_stages:
            run = inprocess(cfg.model, cfg.draft, "specpipe", n, cfg.width, cfg.refill_depth, ids,
                            cfg.max_new_tokens, cfg.hf_threads, numerics=cfg.numerics)
            out["runs"][run["label"]] = run
    except (*FAILURES, RuntimeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return with_services(out, services, prompts, cfg.stages)


def with_services(out: dict, services: dict, prompts: list[dict], stages: int) -> dict:
    """Section 2's rows for the services' runs of section 1, and every run compared with `generate()`."""
    for policy, v in services.get("policies", {}).items():
        detail = v["requests_detail"]
        out["runs"][f"services_{policy}"] = {
            "label": f"services_{policy}", "outputs": [r["output_ids"] for r in detail],
            "wall_s": [r["e2e_s"] for r in detail], "tokens": v["tokens"], "total_s": v["e2e_s"],
            "tokens_per_s": v["tokens_per_s"], "threads": v["cluster"]["threads"], "stages": stages}
    if services.get("error"):
        out["error"] = (out["error"] or "") + f" services: {services['error']}"
    ref = out["runs"].get("hf_generate")
    others = {k: v["outputs"] for k, v in out["runs"].items() if k != "hf_generate"}
    out.update(compare(ref["outputs"], others, prompts) if ref else {"identical": False, "mismatches": []})
    return out


def update_single_request(cfg: ServingConfig, cached: dict) -> dict:
    """Re-measure section 1 and splice it into earlier results (a change that touches only the services):
    section 2's services rows and section 4 are recomputed from it; the rest is kept, and the results say so."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    single = single_request(cfg)
    out = {**cached, "single_request": single}
    if "hf_baseline" in cached:
        prompts = bench_prompts(cfg, cfg.model, cfg.prompts_per_file)
        runs = {k: v for k, v in cached["hf_baseline"]["runs"].items() if not k.startswith("services_")}
        out["hf_baseline"] = with_services({**cached["hf_baseline"], "runs": runs, "error": None}, single, prompts,
                                           cfg.stages)
    if "resources" in cached:
        out["resources"] = resources(cfg, single, cached.get("load"))
    out["updated"] = {"sections": [1], "started": started, "note": "section 1 re-measured and spliced in; "
                      "section 2's services rows and section 4 recomputed from it; the rest from "
                      f"the run started {cached.get('started')}"}
    return out


# ---- section 3 ----------------------------------------------------------------------------------------------
def _drive(cluster: ServiceCluster, reader: StreamReader, prompts: list[dict], n: int, max_new: int, tag: str,
           concurrency: int | None = None, offsets: list[float] | None = None) -> list[Trace]:
    """Closed loop (keep `concurrency` requests open) or open loop (submit request i at offsets[i] seconds)."""
    done, nxt, start = [], 0, time.perf_counter()
    deadline = time.monotonic() + reader.timeout_s
    while len(done) < n:
        now = time.perf_counter() - start
        while nxt < n and (len(reader.open) < concurrency if concurrency else offsets[nxt] <= now):
            reader.submit(f"{tag}-{nxt}", nxt % len(prompts), prompts[nxt % len(prompts)]["ids"], max_new)
            nxt += 1
        wait = 0.1 if concurrency or nxt >= n else min(0.1, max(0.001, offsets[nxt] - now))
        done += reader.poll(int(wait * 1000))
        cluster.check()
        if time.monotonic() > deadline:
            raise ClusterError(f"load point {tag}: {n - len(done)} of {n} requests unfinished after "
                               f"{reader.timeout_s:.0f} s; logs in {cluster.log_dir}")
    return done


def _point(cluster: ServiceCluster, reader: StreamReader, prompts: list[dict], cfg: ServingConfig, mode: str,
           value: float, rng: random.Random) -> tuple[dict, list[Trace]]:
    """One load point: `mode` "concurrency" (value = open requests) or "poisson" (value = requests/s)."""
    policy = cluster.spec.policy
    n = max(cfg.requests_per_point, int(value)) if mode == "concurrency" else cfg.poisson_requests
    offsets = None
    if mode == "poisson":
        t, offsets = 0.0, []
        for _ in range(n):
            offsets.append(t)
            t += rng.expovariate(value)
    base = cluster.wait_step(cluster.last_step())
    traces = _drive(cluster, reader, prompts, n, cfg.load_max_new_tokens, f"{policy}-{mode}{value}",
                    concurrency=int(value) if mode == "concurrency" else None, offsets=offsets)
    end = cluster.wait_step(max((t.steps[-1] for t in traces if t.steps), default=base))
    out = _latency(traces)
    span = max(t.arrivals[-1] for t in traces if t.arrivals) - min(t.submitted for t in traces) if out["tokens"] else 0
    out.update(policy=policy, mode=mode, value=value, steps=end - base, wall_s=span,
               tokens_per_step=out["tokens"] / (end - base) if end > base else None,
               tokens_per_s=out["tokens"] / span if span else None)
    return out, traces


def load(cfg: ServingConfig, pool: ClusterPool | None = None) -> dict:
    """Section 3: concurrency and Poisson sweeps through a pp and a specpipe cluster (see the module doc)."""
    model, draft = cfg.load_model or cfg.model, cfg.load_draft or cfg.draft
    files = cfg.load_files or cfg.prompt_files
    prompts = bench_prompts(cfg, model, -(-cfg.load_prompts // len(files)), cfg.load_prompts, files)
    out = {"section": "load", "machine": machine(), "model": model, "draft": draft, "stages": cfg.stages,
           "width": cfg.width, "max_new_tokens": cfg.load_max_new_tokens, "prompts": _meta(prompts),
           "measured_at": "redis queue (RequestMsg XADD -> TokensMsg XREAD), no HTTP", "points": [], "clusters": {},
           "lossless": {}, "error": None}
    checked, mismatches = 0, []
    try:
        reference = inprocess(model, "ngram", "pp", 1, cfg.width, None, [p["ids"] for p in prompts],
                              cfg.load_max_new_tokens, cfg.hf_threads)["outputs"]
        with _clusters(cfg, pool) as clusters:
            for policy in ("pp", "specpipe"):
                rng = random.Random(cfg.seed)
                cluster = clusters.get(cfg.spec(policy, load=True), prompts[0]["ids"])
                reader = StreamReader(cluster, cfg.request_timeout_s)
                first = cluster.wait_step(cluster.last_step())
                sweep = [("concurrency", c) for c in cfg.concurrencies] + [("poisson", r) for r in cfg.rates]
                for mode, value in sweep:
                    point, traces = _point(cluster, reader, prompts, cfg, mode, value, rng)
                    out["points"].append(point)
                    for t in traces:
                        checked += 1
                        i = _first_diff(reference[t.prompt], t.tokens)
                        if i is not None:
                            mismatches.append({"request": t.request_id, "prompt": f"{prompts[t.prompt]['file']}#"
                                               f"{prompts[t.prompt]['id']}", "first_diff": i})
                last = cluster.wait_step(cluster.last_step(), stages=True)
                out["clusters"][policy] = _cluster_info(cluster, first, last)
    except (*FAILURES, RuntimeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["lossless"] = {"reference": "plain decoding of each prompt alone (in-process pp, 1 stage)",
                       "checked": checked, "identical": checked > 0 and not mismatches, "mismatches": mismatches[:20],
                       "mismatch_count": len(mismatches)}
    return out


# ---- section 4 ----------------------------------------------------------------------------------------------
def resources(cfg: ServingConfig, single: dict | None = None, loaded: dict | None = None) -> dict:
    """Section 4: per cluster of sections 1 and 3 (section 1 is run here when neither is given): each
    process's peak RSS beside the fp32 weight bytes its stage holds and model size / N, and the wire split
    of every measured step of that cluster."""
    if single is None and loaded is None:
        single = single_request(cfg)
    clusters = [(f"single request, {p}", c["cluster"]) for p, c in (single or {}).get("policies", {}).items()]
    shared = {c["prefix"] for _, c in clusters}
    clusters += [(f"load sweep, {p}" + (" (same cluster as above: peak over both)" if c["prefix"] in shared else ""), c)
                 for p, c in (loaded or {}).get("clusters", {}).items()]
    weights = {m: stage_weight_bytes(m, cfg.stages) for m in {c["model"] for _, c in clusters}}
    rows = []
    for label, c in clusters:
        w = weights[c["model"]]
        rows.append({"run": label, "model": c["model"], "policy": c["policy"], "stages": c["stages"],
                     "threads": c["threads"], "model_bytes": w["model_bytes"],
                     "model_bytes_over_n": w["model_bytes"] / c["stages"], "stage_weight_bytes": w["stage_bytes"],
                     "peak_rss_bytes": c["peak_rss_bytes"], "wire": c["wire"]})
    return {"section": "resources", "machine": machine(), "rows": rows,
            "error": (single or {}).get("error") or (loaded or {}).get("error")}


# ---- everything ---------------------------------------------------------------------------------------------
def run_all(cfg: ServingConfig, sections: tuple[int, ...] = (1, 2, 3, 4), progress: bool = True) -> dict:
    """The sections in order, sharing runs: 2 reuses 1's services run, 4 reads 1's and 3's clusters."""
    started = time.perf_counter()
    out: dict = {"config": dataclasses.asdict(cfg), "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def timed(name: str, fn) -> dict:
        t = time.perf_counter()
        if progress:
            print(f"serving: {name} ...", file=sys.stderr, flush=True)
        result = fn()
        result["elapsed_s"] = time.perf_counter() - t
        if progress:
            print(f"serving: {name} done in {result['elapsed_s']:.0f} s{' (error)' if result.get('error') else ''}",
                  file=sys.stderr, flush=True)
        return result

    with ClusterPool(cfg.request_timeout_s) as pool:  # sections 1 and 3 share clusters when their specs match
        if 1 in sections or 2 in sections:
            out["single_request"] = timed("1 single request", lambda: single_request(cfg, pool))
        if cfg.spec("pp") != cfg.spec("pp", load=True):
            pool.close()  # free their memory before transformers loads the models
        if 2 in sections:
            out["hf_baseline"] = timed("2 HF baseline", lambda: hf_baseline(cfg, out["single_request"]))
        if 3 in sections:
            out["load"] = timed("3 load", lambda: load(cfg, pool))
    if 4 in sections:
        out["resources"] = timed("4 resources", lambda: resources(cfg, out.get("single_request"), out.get("load")))
    out["elapsed_s"] = time.perf_counter() - started
    return out


def markdown(results: dict) -> str:
    from benchmarks.serving_report import markdown as render

    return render(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the report's setting (Qwen pair; about an hour here)")
    p.add_argument("--quick", action="store_true", help="smollm2-135m, a few minutes (the default)")
    p.add_argument("--sections", default="1,2,3,4")
    p.add_argument("--prompts-per-file", type=int, default=None, help="sections 1-2: prompts of each workload")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cluster process")
    p.add_argument("--hf-threads", type=int, default=None, help="torch threads of transformers / in-process runs")
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--markdown", default=None, help="write the markdown sections here")
    p.add_argument("--update", type=Path, default=None, help="re-measure section 1 only and splice it into this "
                   "results file (written back; sections 2's services rows and 4 recomputed)")
    a = p.parse_args(argv)
    cfg = full_config() if a.full else quick_config()
    for field_name in ("prompts_per_file", "threads", "hf_threads"):
        if getattr(a, field_name):
            cfg = dataclasses.replace(cfg, **{field_name: getattr(a, field_name)})
    if a.update:
        results = update_single_request(cfg, json.loads(a.update.read_text()))
        a.update.write_text(json.dumps(results, default=str))
    else:
        results = run_all(cfg, tuple(int(s) for s in a.sections.split(",")))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
    text = markdown(results)
    if a.markdown:
        Path(a.markdown).write_text(text)
    print(text)
    sections = [v for v in results.values() if isinstance(v, dict)]
    failed = [v for v in sections if v.get("error") or v.get("identical") is False
              or v.get("lossless", {}).get("identical") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
