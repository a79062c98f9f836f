"""`specpipe up`: the whole local cluster in one command.

Starts Redis if none answers (loopback only), the scheduler, N stage workers,
the draft workers and, once it exists, the gateway and its batch worker (Celery); Ctrl-C (or SIGTERM) stops
every child cleanly. Everything binds to loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared.environment import DEFAULTS, env
from shared.service_args import add_attention_args, add_realtime_args, attention_config
from shared.transport.redis_io import RedisConfig, connect, ensure_redis, not_alive, pipeline_components, stage_name
from shared.types.config import (
    DEFAULT_NUMERICS,
    DRAFT_MODES,
    DRAFT_VOCAB_HELP,
    DTYPES,
    LAYER_SPLIT_HELP,
    NGRAM_SHARED_HELP,
    NUMERICS,
    NUMERICS_HELP,
    WIDTH_RULES,
    AttentionConfig,
    check_draft_vocab,
    check_ngram_shared,
)
from shared.types.errors import ConfigError
from specpipe.supervisor import RESTART_POLICIES, Child, RestartPolicy, Supervisor

MEASURED = "measured"  # --layer-split: counts from timing this host's stages (resolve_layer_split), before any starts
SPLIT_MEASURE_TIMEOUT_S = 600.0  # loading two stages of a large model on a CPU and timing a few steps
AUTO = "auto"  # --ngram-in: the scheduler where the stages compute on the CPU, workers where on GPUs
NGRAM_PLACES = (AUTO, "scheduler", "workers")  # where the n-gram draft is looked up (ClusterConfig.local_ngram)


@dataclass(frozen=True)
class ServiceLimits:
    """What the services refuse or bound, as `specpipe up` passes them on (defaults: the services' own)."""

    max_queue: int = 256  # scheduler: requests waiting for KV room; past it "queue full" (429)
    kv_slots: int = 1 << 16  # scheduler: KV slots per stage shared by admitted requests
    max_inflight: int = 256  # gateway: requests queued or running; past it 429 with Retry-After
    max_body_bytes: int = 1 << 20  # gateway: request bodies past it get 413
    max_file_bytes: int = 64 << 20  # gateway: a batch input file (POST /v1/files) past it gets 413
    request_timeout_s: float = 600.0  # gateway: a request still running then ends with 504 (and is cancelled)
    max_model_len: int = 0  # gateway: prompt + max_tokens must fit (0: the model's own context)

    def scheduler_args(self) -> list[str]:
        return ["--max-queue", str(self.max_queue), "--kv-slots", str(self.kv_slots)]

    def gateway_args(self) -> list[str]:
        return ["--max-inflight", str(self.max_inflight), "--max-body-bytes", str(self.max_body_bytes),
                "--max-file-bytes", str(self.max_file_bytes), *self.request_args()]

    def request_args(self) -> list[str]:
        """What bounds each request, the batch worker's lines too."""
        return ["--request-timeout", str(self.request_timeout_s), "--max-model-len", str(self.max_model_len)]


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "smollm2-135m"
    draft: str = "ngram"
    policy: str = "specpipe"
    stages: int = 2
    width: int = 4
    width_rule: str = "cost"  # specpipe: how the scheduler sizes each request's width (PolicyConfig.width_rule)
    async_scheduling: bool = False  # schedule step t+1 while t computes (PolicyConfig.async_scheduling)
    realtime_priority: int = 0  # SCHED_FIFO priority of the scheduler, stages and drafts (0: off; --realtime-priority)
    drafts: int = 1
    ngram_in: str = AUTO  # where the n-gram draft is looked up (NGRAM_PLACES; local_ngram)
    token_budget: int = 256
    redis_url: str = DEFAULTS["REDIS_URL"]
    prefix: str = DEFAULTS["SPECPIPE_PREFIX"]
    master_port: int = 0  # stage 0's rendezvous port; 0: a free one per pipeline run, shared through Redis
    port: int = 8000  # gateway
    extra: tuple[str, ...] = field(default_factory=tuple)  # more scheduler flags (after the others: they win)
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # the stages' prefill attention; the gateway reports it
    device: str | None = None  # the stages' and drafts' --device (cpu, cuda, cuda:N); None: theirs (cuda if any)
    dtype: str | None = None  # the stages' --dtype; None: the device's (bfloat16 on a GPU, float32 on a CPU)
    draft_dtype: str | None = None  # the draft workers' model dtype (any stays lossless); None: the device's
    draft_vocab: int = 0  # > 0: the draft's LM head scores this many frequent tokens and each request's own
    ngram_shared: int = 0  # > 0: the n-gram draft's table across requests, in tokens (EngineConfig.ngram_shared)
    numerics: str = DEFAULT_NUMERICS  # the stages' and drafts' kernels (shared.types.config.NUMERICS)
    layer_split: str = "balanced"  # which layers each stage holds (stage_bounds), or MEASURED (resolve_layer_split)
    limits: ServiceLimits = ServiceLimits()
    api_keys: tuple[str, ...] = ()  # handed to the gateway through its environment, never on a command line
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    host: str = "127.0.0.1"  # the gateway's address: loopback unless given deliberately
    threads: int = 0  # torch threads of each stage and draft process; 0: the host's cores shared among them

    def attention_args(self) -> list[str]:
        a = self.attention
        return ["--attention", a.kind, "--group-size", str(a.group_size), "--block-rows", str(a.block_rows),
                "--distr-layers", a.layers, "--distr-layout", a.layout, "--distr-fuse", a.fuse,
                "--distr-bucket", a.bucket]

    @property
    def local_ngram(self) -> bool:
        """Whether the scheduler answers the n-gram draft itself (then no draft worker starts); under pp too, for
        the requests that ask for a speculative policy. `auto`: where the stages compute on the CPU. A lookup
        computes nothing, and a worker adds its round trips to each level (a refill's levels one after another),
        on cores the stages fill; with GPU stages, steps of a few ms and cores to spare, a worker keeps the
        lookups of many requests off the scheduler's loop (BENCHMARKS.md, issue 15, session 25)."""
        if self.draft != "ngram" or self.drafts < 1:
            return False
        return self.ngram_in == "scheduler" or (self.ngram_in == AUTO and not self.stages_on_gpu())

    def stages_on_gpu(self) -> bool:
        """Whether the stages compute on GPUs: `device`, or where it is left to them, whether this host has one."""
        if self.device is not None:
            return self.device.startswith("cuda")
        import torch  # only here: the launcher needs it for nothing else

        return torch.cuda.is_available()

    @property
    def draft_workers(self) -> int:
        """Draft worker processes: `drafts`, none under pp or where the scheduler drafts (local_ngram)."""
        return 0 if self.policy == "pp" or self.local_ngram else self.drafts

    def scheduler_draft_args(self) -> list[str]:
        """--local-draft where the scheduler answers the n-gram draft itself."""
        return ["--local-draft", "ngram", "--ngram-shared", str(self.ngram_shared)] if self.local_ngram else []

    def compute_threads(self) -> int:
        """Torch threads of each stage and draft process: `threads`, or the cores shared (not oversubscribed)."""
        return self.threads or max(1, (os.cpu_count() or 1) // (self.stages + self.draft_workers))

    def common_args(self) -> list[str]:
        return ["--redis-url", self.redis_url, "--prefix", self.prefix, "--model", self.model]

    def beat_args(self) -> list[str]:
        """What the processes on the beat (scheduler, stages, drafts) take beyond the common arguments."""
        return ["--realtime-priority", str(self.realtime_priority)] if self.realtime_priority else []

    def device_args(self, dtype: str | None) -> list[str]:
        """A compute process's --device and --dtype, where given (else the process picks by what it sees)."""
        return [*(("--device", self.device) if self.device else ()), *(("--dtype", dtype) if dtype else ())]

    def local_ranks(self) -> dict[str, int]:
        """Which GPU a bare `--device cuda` means for each compute process (LOCAL_RANK, modulo the GPUs there):
        stage k the k-th, the draft workers the ones after the stages'."""
        return {**{stage_name(k): k for k in range(self.stages)},
                **{f"draft-{i}": self.stages + i for i in range(self.draft_workers)}}


HTTP = ("gateway", "batch-worker")  # the cluster's HTTP front, in commands() once the gateway exists


def commands(cfg: ClusterConfig) -> dict[str, list[str]]:
    """Every process of the cluster and its command line (also what docker-compose runs): the one definition
    that `specpipe up`, the benchmarks and the tests' clusters start."""
    py = sys.executable
    procs = {
        "scheduler": [py, "-m", "scheduler", *cfg.common_args(), *cfg.beat_args(), "--policy", cfg.policy,
                      "--stages", str(cfg.stages), "--width", str(cfg.width), "--width-rule", cfg.width_rule,
                      "--token-budget", str(cfg.token_budget),
                      *(["--async-scheduling"] if cfg.async_scheduling else []), *cfg.scheduler_draft_args(),
                      *cfg.limits.scheduler_args(), *cfg.extra],
    }
    for k in range(cfg.stages):
        procs[stage_name(k)] = [py, "-m", "stage_worker", *cfg.common_args(), *cfg.beat_args(),
                                "--threads", str(cfg.compute_threads()), "--rank", str(k), "--world", str(cfg.stages),
                                "--master-port", str(cfg.master_port),
                                "--numerics", cfg.numerics, "--layer-split", cfg.layer_split, *cfg.attention_args(),
                                *cfg.device_args(cfg.dtype)]
    for i in range(cfg.draft_workers):
        procs[f"draft-{i}"] = draft_command(cfg, f"draft-{i}")
    gateway = Path(__file__).resolve().parents[1] / "gateway" / "__main__.py"
    if gateway.exists():
        procs["gateway"] = [py, "-m", "gateway", "--redis-url", cfg.redis_url, "--prefix", cfg.prefix,
                            "--model", cfg.model, "--host", cfg.host, "--port", str(cfg.port),
                            "--stages", str(cfg.stages), "--attention", cfg.attention.kind, *cfg.limits.gateway_args()]
        procs["batch-worker"] = [py, "-m", "gateway.batches.worker", "--redis-url", cfg.redis_url,  # Celery /v1/batches
                                 "--prefix", cfg.prefix, "--model", cfg.model, "--stages", str(cfg.stages),
                                 "--attention", cfg.attention.kind, *cfg.limits.request_args()]
    return procs


def draft_command(cfg: ClusterConfig, name: str) -> list[str]:
    """One draft worker's command line (commands() names them draft-0, draft-1, ...)."""
    return [sys.executable, "-m", "draft_worker", *cfg.common_args(), *cfg.beat_args(),
            "--threads", str(cfg.compute_threads()), "--draft", cfg.draft, "--name", name, "--numerics", cfg.numerics,
            "--vocab", str(cfg.draft_vocab), "--ngram-shared", str(cfg.ngram_shared), *cfg.device_args(cfg.draft_dtype)]


def pipeline_commands(cfg: ClusterConfig) -> dict[str, list[str]]:
    """commands() without the HTTP front: scheduler, stages and draft workers (requests go straight into the
    `requests` stream)."""
    return {name: cmd for name, cmd in commands(cfg).items() if name not in HTTP}


def spawn(cmd: list[str], log: Path, cwd: Path | None = None, **env: str) -> subprocess.Popen:
    """Start one child, its output (stdout and stderr, unbuffered) appended to `log`; `env` adds variables."""
    with open(log, "a") as out:  # the child holds its own copy of the file
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


def resolve_layer_split(cfg: ClusterConfig) -> ClusterConfig:
    """`cfg` with layer_split MEASURED turned into counts: shared.compute.split_measure times the balanced
    split's first and last stage in a process of its own, once, and every stage gets the same counts. Where it
    fails, the balanced split (and a warning): a cluster still starts."""
    if cfg.layer_split != MEASURED:
        return cfg
    cmd = [sys.executable, "-m", "shared.compute.split_measure", "--model", cfg.model, "--stages", str(cfg.stages),
           "--numerics", cfg.numerics, "--dtype", cfg.dtype or "float32", "--threads", str(cfg.compute_threads()),
           "--device", cfg.device or "auto"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SPLIT_MEASURE_TIMEOUT_S, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        split = ",".join(str(n) for n in measured["counts"])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, KeyError) as exc:
        why = (exc.stderr or "").strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) else []
        print(f"specpipe up: measuring the layer split failed ({why[0] if why else exc}); the balanced split "
              "instead", file=sys.stderr)
        return replace(cfg, layer_split="balanced")
    how = measured.get("why") or (f"the LM head takes {measured['head_layers']:.1f} layers' time "
                                  f"({measured['weights_head_layers']:.1f} layers' weights)")
    print(f"specpipe up: layer split {split}: {how}", file=sys.stderr)
    return replace(cfg, layer_split=split)


def up(cfg: ClusterConfig) -> int:
    from shared.model_store import resolve_model

    resolve_model(cfg.model, progress=True)  # convert once here, not in every child at the same time
    cfg = resolve_layer_split(cfg)
    if cfg.draft != "ngram" and cfg.policy != "pp":
        resolve_model(cfg.draft, progress=True)
    redis_proc = ensure_redis(cfg.redis_url)
    rcfg = RedisConfig(cfg.redis_url, cfg.prefix)
    r = connect(rcfg)
    supervisor = Supervisor(children(cfg), cfg.restart, on_exit=lambda name: r.delete(rcfg.heartbeat(name)))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    supervisor.start()
    ready_reported = False
    try:
        while not stopping:
            reason = supervisor.poll()
            if reason is not None:
                print(f"specpipe up: {reason}; stopping the cluster", file=sys.stderr)
                return 1
            if not ready_reported and _ready(rcfg, cfg.stages):
                print(f"specpipe up: ready ({cfg.stages} stages, policy {cfg.policy}, model {cfg.model}, "
                      f"keys under '{cfg.prefix}:', http://{cfg.host}:{cfg.port})", file=sys.stderr)
                ready_reported = True
            time.sleep(0.2)
        return 0
    finally:
        stop_processes(supervisor.processes(), signal.SIGINT)
        if redis_proc is not None:
            redis_proc.terminate()


def children(cfg: ClusterConfig) -> list[Child]:
    """The supervised processes: a draft worker or the batch worker is not essential to serving. The gateway gets
    the API keys through its environment, each compute process its LOCAL_RANK (its GPU under a bare cuda)."""
    ranks = cfg.local_ranks()
    envs = {"gateway": dict(os.environ, SPECPIPE_API_KEYS=",".join(cfg.api_keys)),
            **{name: dict(os.environ, LOCAL_RANK=str(rank)) for name, rank in ranks.items()}}
    return [Child(name, cmd, essential=not (name.startswith("draft-") or name == "batch-worker"), env=envs.get(name))
            for name, cmd in commands(cfg).items()]


def _ready(rcfg: RedisConfig, stages: int) -> bool:
    try:
        r = connect(rcfg)
        return not not_alive(r, rcfg, pipeline_components(stages))
    except Exception:  # noqa: BLE001 (not up yet, whatever the reason)
        return False


def free_port() -> int:
    """A free TCP port on loopback (for a gateway, a torch.distributed rendezvous, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, procs: dict[str, subprocess.Popen], timeout_s: float,
                         poll_s: float = 0.2) -> None:
    """GET `url` until it answers 200 (a gateway's /health or /ready). RuntimeError as soon as one of `procs`
    exits, TimeoutError after timeout_s."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [name for name, p in procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not up yet, or not ready (503)
        time.sleep(poll_s)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def stop_processes(procs: Iterable[subprocess.Popen], sig: int = signal.SIGTERM, grace_s: float = 10) -> None:
    """Signal every live process, wait up to grace_s in total, then kill what is left."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def delete_keys(r, prefix: str) -> None:
    """Remove every key of one cluster (its streams, heartbeats, timings)."""
    keys = list(r.scan_iter(f"{prefix}:*"))
    if keys:
        r.delete(*keys)


def up_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="specpipe up", description="start the local cluster",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", default="ngram", help="draft model name/path, or 'ngram'")
    p.add_argument("--policy", default="specpipe", choices=["pp", "tree", "specpipe"])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--width-rule", choices=WIDTH_RULES, default="cost",
                   help="specpipe: cost sizes each request's width from its acceptance and the measured step cost "
                        "(0 under saturation); budget keeps --width while the token budget allows")
    p.add_argument("--drafts", type=int, default=1,
                   help="draft worker processes (0: nothing drafted); for the n-gram draft, only where --ngram-in "
                        "places it in workers")
    p.add_argument("--ngram-in", choices=NGRAM_PLACES, default=AUTO,
                   help="where the n-gram draft is looked up: scheduler (its own process: no round trip per level), "
                        "workers (--drafts draft worker processes, beside the scheduler's loop), auto (the scheduler "
                        "where the stages compute on the CPU, workers where they compute on GPUs)")
    p.add_argument("--device", default=None,
                   help="the stages' and drafts' device: cpu, cuda (stage k on GPU k, the drafts on the GPUs after "
                        "the stages', modulo the GPUs there) or cuda:N (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the stages' dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--draft-dtype", choices=DTYPES, default=None,
                   help="the draft model's dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--draft-vocab", type=int, default=0, help=DRAFT_VOCAB_HELP)
    p.add_argument("--ngram-shared", type=int, default=0, help=NGRAM_SHARED_HELP)
    p.add_argument("--numerics", choices=NUMERICS, default=DEFAULT_NUMERICS,
                   help=NUMERICS_HELP)
    p.add_argument("--layer-split", default=MEASURED,
                   help=f"{MEASURED} (default) times this host's stages before they start and balances their decode "
                        "steps (shared/compute/split_measure.py); or " + LAYER_SPLIT_HELP)
    p.add_argument("--token-budget", type=int, default=256, help="rows per pipeline step")
    p.add_argument("--redis-url", default=env("REDIS_URL"))
    p.add_argument("--prefix", default=env("SPECPIPE_PREFIX"),
                   help="key prefix: clusters sharing a Redis need different ones")
    p.add_argument("--master-port", type=int, default=int(env("MASTER_PORT")),
                   help="stage 0's rendezvous port (0: a free one per pipeline run)")
    p.add_argument("--restart", choices=RESTART_POLICIES, default="on-failure",
                   help="restart a child that exits (on-failure: a non-zero exit or a signal)")
    add_attention_args(p)
    g = p.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1", help="the gateway's address (loopback unless given)")
    g.add_argument("--port", type=int, default=8000, help="the gateway's port")
    g.add_argument("--api-keys", default=argparse.SUPPRESS,  # never shown by --help
                   help="comma-separated bearer keys (default: $SPECPIPE_API_KEYS; none: no authentication)")
    limits = ServiceLimits()
    g.add_argument("--max-inflight", type=int, default=limits.max_inflight, help="past it: 429 with Retry-After")
    g.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="past it: 413")
    g.add_argument("--max-file-bytes", type=int, default=limits.max_file_bytes,
                   help="a batch input file past it: 413")
    g.add_argument("--request-timeout", type=float, default=limits.request_timeout_s, help="seconds before 504")
    g.add_argument("--max-model-len", type=int, default=limits.max_model_len, help="0: the model's context")
    sch = p.add_argument_group("scheduler")
    sch.add_argument("--max-queue", type=int, default=limits.max_queue, help="waiting requests; past it 429")
    sch.add_argument("--kv-slots", type=int, default=limits.kv_slots, help="KV slots per stage for admission")
    sch.add_argument("--draft-mode", choices=tuple(DRAFT_MODES), default="auto",
                     help="whether steps wait for the draft's levels (auto: the width plan chooses by cost)")
    sch.add_argument("--draft-wait-ms", type=float, default=1000.0,
                     help="a waiting step waits up to this long for the draft's proposals (0: never wait)")
    sch.add_argument("--async-scheduling", action="store_true",
                     help="schedule step t+1 while the stages compute step t (no step waits for the scheduler; "
                          "prunes and refills one step late): for GPU-sized steps of a few ms")
    add_realtime_args(sch, who="the scheduler, the stages and the draft workers")
    a = p.parse_args(argv)
    try:  # before any process starts, not in a draft worker's restart loop
        check_draft_vocab(a.draft_vocab)
    except ConfigError as exc:
        p.error(f"--draft-vocab: {exc}")
    try:
        check_ngram_shared(a.ngram_shared)
    except ConfigError as exc:
        p.error(f"--ngram-shared: {exc}")
    env_keys = env("SPECPIPE_API_KEYS")
    cfg = ClusterConfig(
        model=a.model, draft=a.draft, policy=a.policy, stages=a.stages, width=a.width,
        width_rule=a.width_rule, async_scheduling=a.async_scheduling, realtime_priority=a.realtime_priority,
        drafts=a.drafts, ngram_in=a.ngram_in,
        token_budget=a.token_budget, redis_url=a.redis_url, prefix=a.prefix, master_port=a.master_port, port=a.port,
        host=a.host, attention=attention_config(a), device=a.device, dtype=a.dtype, draft_dtype=a.draft_dtype,
        draft_vocab=a.draft_vocab, ngram_shared=a.ngram_shared, numerics=a.numerics, layer_split=a.layer_split,
        limits=ServiceLimits(max_queue=a.max_queue, kv_slots=a.kv_slots, max_inflight=a.max_inflight,
                             max_body_bytes=a.max_body_bytes, max_file_bytes=a.max_file_bytes,
                             request_timeout_s=a.request_timeout, max_model_len=a.max_model_len),
        extra=("--draft-mode", a.draft_mode, "--draft-wait-ms", str(a.draft_wait_ms)),
        api_keys=tuple(k.strip() for k in getattr(a, "api_keys", env_keys).split(",") if k.strip()),
        restart=RestartPolicy(a.restart),
    )
    return up(cfg)
