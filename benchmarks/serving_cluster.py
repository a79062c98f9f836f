"""A local SpecPipe cluster for benchmarks, and a client that timestamps every token at the Redis queue.

`ServiceCluster` starts the processes of `specpipe.cluster.pipeline_commands` (scheduler, N stage workers, a
draft worker for a draft model unless the policy is pp, the n-gram draft in the scheduler; no gateway: requests
go straight into the `requests` stream) under a fresh key prefix and rendezvous port, loopback only, and stops
them and deletes their keys on `close()`. A dead process or a missed deadline raises `ClusterError` with the tail
of that process's log, never hangs.

`StreamReader` submits `RequestMsg`s (shared/queue_client.submit) and follows every open `out:{request}`
stream with one blocking XREAD: each `TokensMsg` is stamped with `time.perf_counter()` when the XREAD that
returned it came back, and every token of the message gets that stamp (tokens arriving in a group arrive at
the same time).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.wire_overhead import overhead, step_rows
from shared.environment import DEFAULTS
from shared.model_store import resolve_model
from shared.transport.queue_client import submit
from shared.transport.redis_io import (
    RedisConfig,
    alive,
    connect,
    decode_or_log,
    ensure_redis,
    pipeline_components,
    stage_name,
)
from shared.types.config import DEFAULT_NUMERICS, ModelArch, stage_bounds
from shared.wire.messages import RequestMsg, SchedulerStatsMsg, TokensMsg
from specpipe.cluster import (
    AUTO,
    MEASURED,
    ClusterConfig,
    delete_keys,
    free_port,
    pipeline_commands,
    resolve_layer_split,
    spawn,
    stop_processes,
)

ROOT = Path(__file__).resolve().parents[1]


class ClusterError(RuntimeError):
    """A cluster process died, or the cluster missed a deadline."""


# ---- one request's token arrivals ---------------------------------------------------------------------------
@dataclass
class Trace:
    request_id: str
    prompt: int  # index into the benchmark's prompt list
    submitted: float  # perf_counter at XADD
    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # one per token: its TokensMsg's arrival
    steps: list[int] = field(default_factory=list)  # one per token: the pipeline step that produced it
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.submitted if self.arrivals else None

    @property
    def tbt(self) -> float | None:
        """(last token's arrival - first token's arrival) / (tokens - 1)."""
        n = len(self.arrivals)
        return (self.arrivals[-1] - self.arrivals[0]) / (n - 1) if n > 1 else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    @property
    def e2e(self) -> float | None:
        return self.arrivals[-1] - self.submitted if self.arrivals else None

    def summary(self) -> dict:
        return {"request_id": self.request_id, "prompt": self.prompt, "tokens": len(self.tokens),
                "output_ids": self.tokens, "ttft_s": self.ttft, "tbt_s": self.tbt, "e2e_s": self.e2e,
                "first_step": self.steps[0] if self.steps else None,
                "last_step": self.steps[-1] if self.steps else None,
                "finish_reason": self.finish_reason, "error": self.error}


# ---- the cluster ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterSpec:
    model: str
    draft: str
    policy: str
    stages: int = 2
    width: int = 4
    refill_depth: int | None = None
    threads: int | None = None  # torch threads per compute process; None: specpipe.cluster's share of the cores
    redis_url: str = DEFAULTS["REDIS_URL"]
    start_timeout_s: float = 300.0
    log_dir: str | None = None
    draft_dtype: str = "float32"
    numerics: str = DEFAULT_NUMERICS
    async_scheduling: bool = False  # the scheduler's --async-scheduling
    ngram_shared: int = 0  # the n-gram draft's table across requests, in tokens (0: none)
    layer_split: str = MEASURED  # which layers each stage holds (stage_bounds), or measured as `specpipe up` does
    ngram_in: str = AUTO  # where the n-gram draft is looked up (--ngram-in; on these CPU clusters, the scheduler)

    def config(self, prefix: str) -> ClusterConfig:
        """The cluster's ClusterConfig under `prefix` (one draft worker where one drafts, a fresh rendezvous
        port)."""
        extra = ("--refill-depth", str(self.refill_depth)) if self.refill_depth is not None else ()
        return ClusterConfig(model=self.model, draft=self.draft, policy=self.policy, stages=self.stages,
                             width=self.width, drafts=1, redis_url=self.redis_url, prefix=prefix,
                             master_port=free_port(), extra=extra, draft_dtype=self.draft_dtype,
                             threads=self.threads or 0, numerics=self.numerics, device="cpu",
                             async_scheduling=self.async_scheduling, ngram_shared=self.ngram_shared,
                             layer_split=self.layer_split, ngram_in=self.ngram_in)


class ServiceCluster:
    """Scheduler + stages (+ one draft worker for a draft model) as real processes; use as a context manager."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        resolve_model(spec.model)  # convert once here, not in every child at the same time
        if spec.policy != "pp" and spec.draft != "ngram":
            resolve_model(spec.draft)
        self.prefix = f"bench-serving-{uuid.uuid4().hex[:8]}"
        self.rcfg = RedisConfig(spec.redis_url, self.prefix)
        self.redis_proc = ensure_redis(spec.redis_url)
        self.r = connect(self.rcfg)
        self.log_dir = Path(spec.log_dir or Path(tempfile.gettempdir()) / "serving-bench-logs") / self.prefix
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.config = resolve_layer_split(spec.config(self.prefix))
        self.cmds = pipeline_commands(self.config)
        self.started, self.start_s = time.perf_counter(), None

    def __enter__(self) -> ServiceCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def threads(self) -> int:
        """Torch threads of each stage and draft process (what their command lines pass)."""
        return self.config.compute_threads()

    def start(self) -> None:
        threads = str(self.threads)
        for name, cmd in self.cmds.items():
            self.procs[name] = spawn(cmd, self.log_dir / f"{name}.log", cwd=ROOT, OMP_NUM_THREADS=threads,
                                     MKL_NUM_THREADS=threads)
        self.wait_ready()
        self.start_s = time.perf_counter() - self.started

    def components(self) -> list[str]:
        return [*pipeline_components(self.spec.stages), *(["draft-0"] if "draft-0" in self.procs else [])]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        while not all(alive(self.r, self.rcfg, n) for n in self.components()):
            self.check()
            if time.monotonic() > deadline:
                raise ClusterError(f"the cluster was not ready within {self.spec.start_timeout_s:.0f} s "
                                   f"(logs in {self.log_dir})")
            time.sleep(0.2)

    def check(self) -> None:
        """Raise ClusterError naming any process that exited, with the end of its log."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-1500:]
                raise ClusterError(f"{name} exited with status {proc.returncode}; log {self.log_dir}/{name}.log "
                                   f"ends:\n{tail}")

    def close(self) -> None:
        stop_processes(self.procs.values())
        delete_keys(self.r, self.prefix)
        if self.redis_proc is not None:
            self.redis_proc.terminate()

    # ---- what the processes report ---------------------------------------------------------------------------
    def last_step(self) -> int:
        """The scheduler's last finished step (its timings list is flushed whenever it goes idle)."""
        item = self.r.lindex(self.rcfg.key("timings", "scheduler"), -1)
        return int(item.decode().split(":")[0]) if item else 0

    def wait_step(self, step: int, stages: bool = False, timeout_s: float = 10.0) -> int:
        """Wait until the scheduler (and with `stages`, every stage: they flush within a second of going idle)
        has reported its timings up to `step`; return the scheduler's last step."""
        deadline = time.monotonic() + timeout_s
        names = ["scheduler", *(stage_name(k) for k in range(self.spec.stages) if stages)]
        keys = [self.rcfg.key("timings", n) for n in names]
        while True:
            last = [self.r.lindex(k, -1) for k in keys]
            if all(x is not None and int(x.decode().split(":")[0]) >= step for x in last):
                return self.last_step()
            if time.monotonic() > deadline:
                return self.last_step()  # a stage that never flushed: the wire summary skips those steps
            time.sleep(0.1)

    def wire(self, first_step: int, last_step: int | None = None) -> dict:
        """benchmarks.wire_overhead's per-step split (compute / scheduler / wire) over a range of steps."""
        return overhead(step_rows(self.r, self.rcfg, self.spec.stages, first_step, last_step))

    def stats(self, newer_than: float = 0.0, timeout_s: float = 5.0) -> SchedulerStatsMsg | None:
        """The scheduler's stats snapshot, once one written after `newer_than` (wall clock) is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            raw = self.r.get(self.rcfg.stats)
            msg = decode_or_log(raw, SchedulerStatsMsg, "benchmark") if raw else None
            if msg is not None and msg.time >= newer_than or time.monotonic() > deadline:
                return msg
            time.sleep(0.1)

    def peak_memory(self) -> dict[str, int | None]:
        """VmHWM (peak resident set) of every process in bytes, from /proc/<pid>/status."""
        return {name: vm_hwm(p.pid) for name, p in self.procs.items()}

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU seconds (user + system) every process has used so far, and the Redis server's where this cluster
        started it (one it found running serves other clients too)."""
        pids = {name: p.pid for name, p in self.procs.items()}
        pids.update({"redis": self.redis_proc.pid} if self.redis_proc is not None else {})
        return {name: cpu_seconds(pid) for name, pid in pids.items()}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc/<pid>/stat (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- the client --------------------------------------------------------------------------------------------
class StreamReader:
    """Submit requests to one cluster and timestamp their tokens as they arrive in the out streams."""

    def __init__(self, cluster: ServiceCluster, timeout_s: float):
        self.cluster, self.timeout_s = cluster, timeout_s
        self.r = connect(cluster.rcfg)
        self.open: dict[str, Trace] = {}
        self.last: dict[str, str] = {}

    def submit(self, request_id: str, prompt: int, prompt_ids: list[int], max_new_tokens: int) -> Trace:
        trace = Trace(request_id, prompt, time.perf_counter())
        self.open[request_id], self.last[request_id] = trace, "0"
        submit(self.r, self.cluster.rcfg, RequestMsg(request_id, list(prompt_ids), max_new_tokens))
        return trace

    def poll(self, block_ms: int) -> list[Trace]:
        """One XREAD over every open request's stream; returns the requests that finished."""
        if not self.open:
            time.sleep(block_ms / 1000)
            return []
        streams = {self.cluster.rcfg.out(rid): self.last[rid] for rid in self.open}
        reply = self.r.xread(streams, count=256, block=max(1, block_ms))
        now, done = time.perf_counter(), []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                msg = decode_or_log(fields.get(b"m", b""), TokensMsg, "benchmark")
                if msg is None or msg.request_id not in self.open:
                    continue
                self.last[msg.request_id] = entry_id.decode()
                trace = self.open[msg.request_id]
                trace.tokens += msg.tokens
                trace.arrivals += [now] * len(msg.tokens)
                trace.steps += [msg.step] * len(msg.tokens)
                if msg.finished:
                    trace.finished, trace.finish_reason, trace.error = True, msg.finish_reason, msg.error
                    done.append(self.open.pop(msg.request_id))
        return done

    def drain(self) -> None:
        """Wait until every open request finished (ClusterError on a dead process or the timeout)."""
        deadline = time.monotonic() + self.timeout_s
        while self.open:
            self.poll(200)
            self.cluster.check()
            if time.monotonic() > deadline:
                raise ClusterError(f"{len(self.open)} requests unfinished after {self.timeout_s:.0f} s "
                                   f"(e.g. {next(iter(self.open))}); logs in {self.cluster.log_dir}")

    def run_one(self, request_id: str, prompt: int, prompt_ids: list[int], max_new_tokens: int) -> Trace:
        trace = self.submit(request_id, prompt, prompt_ids, max_new_tokens)
        self.drain()
        return trace


# ---- model size -------------------------------------------------------------------------------------------
def _tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors headers (8-byte length + JSON; no weights read)."""
    shapes = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with f.open("rb") as h:
            header = json.loads(h.read(int.from_bytes(h.read(8), "little")))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def stage_weight_bytes(model: str, stages: int, bytes_per_param: int = 4) -> dict:
    """Parameter bytes of the whole model and of each stage as shared/compute/weights.py loads them (fp32):
    its layers, the embedding on the first stage, the final norm and the head on the last (a tied head is
    a second copy of the embedding there)."""
    model_dir = resolve_model(model)
    arch = ModelArch.from_model_dir(model_dir)
    shapes = _tensor_shapes(model_dir)

    def size(names) -> int:
        total = 0
        for n in names:
            numel = 1
            for d in shapes.get(n, [0]):
                numel *= d
            total += numel * bytes_per_param
        return total

    embed = "model.embed_tokens.weight"
    head = embed if arch.tie_embeddings or "lm_head.weight" not in shapes else "lm_head.weight"
    per_stage = []
    for a, b in stage_bounds(arch, stages):  # the stages' default split
        names = [n for n in shapes if any(n.startswith(f"model.layers.{i}.") for i in range(a, b))]
        names += [embed] if a == 0 else []
        names += ["model.norm.weight", head] if b == arch.num_layers else []
        per_stage.append(size(names))
    return {"model_bytes": size(shapes), "stage_bytes": per_stage}


# ---- sharing clusters between sections ---------------------------------------------------------------------
class ClusterPool:
    """Running clusters by spec: sections that ask for the same spec share one cluster, started and warmed up
    once (one short untimed request: a fresh cluster's first steps are slow). `close()` stops them all."""

    def __init__(self, request_timeout_s: float = 900.0):
        self.request_timeout_s = request_timeout_s
        self.clusters: dict[ClusterSpec, ServiceCluster] = {}
        self.redis_proc: subprocess.Popen | None = None  # a Redis this pool had to start (none answered)

    def __enter__(self) -> ClusterPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, spec: ClusterSpec, warm_up_prompt: list[int]) -> ServiceCluster:
        cluster = self.clusters.get(spec)
        if cluster is not None:
            try:
                cluster.check()
                return cluster
            except ClusterError:
                self.clusters.pop(spec).close()
        if not self.clusters and self.redis_proc is None:  # one Redis for every cluster of the pool
            self.redis_proc = ensure_redis(spec.redis_url)
        cluster = ServiceCluster(spec).__enter__()
        self.clusters[spec] = cluster
        trace = StreamReader(cluster, self.request_timeout_s).run_one("warm-up", -1, warm_up_prompt, 4)
        if trace.error or not trace.finished:
            raise ClusterError(f"the warm-up request failed: {trace.error or trace.finish_reason}")
        return cluster

    def release(self, spec: ClusterSpec) -> None:
        """Stop one cluster (its memory back before the next starts)."""
        cluster = self.clusters.pop(spec, None)
        if cluster is not None:
            cluster.close()

    def close(self) -> None:
        while self.clusters:
            self.clusters.popitem()[1].close()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc = None
