"""`specpipe up`: the whole local cluster in one command.

Starts Redis if none answers (loopback only), the scheduler, N stage workers,
the draft workers and, once it exists, the gateway and its batch worker (Celery); Ctrl-C (or SIGTERM) stops
every child cleanly. Everything binds to loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import DTYPES, AttentionConfig
from shared.redis_io import RedisConfig, alive, connect, ensure_redis, pipeline_components, stage_name
from shared.service_args import add_attention_args, attention_config


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "smollm2-135m"
    draft: str = "ngram"
    policy: str = "specpipe"
    stages: int = 2
    width: int = 4
    drafts: int = 1
    token_budget: int = 256
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "specpipe"
    master_port: int = 29531
    port: int = 8000  # gateway
    extra: tuple[str, ...] = field(default_factory=tuple)
    attention: AttentionConfig = AttentionConfig()  # the stages' prefill attention; the gateway reports it
    draft_dtype: str = "float32"  # the draft workers' model dtype (bfloat16 stays lossless)

    def attention_args(self) -> list[str]:
        a = self.attention
        return ["--attention", a.kind, "--group-size", str(a.group_size), "--block-rows", str(a.block_rows)]


def commands(cfg: ClusterConfig) -> dict[str, list[str]]:
    """Every process of the cluster and its command line (also what docker-compose runs)."""
    py = sys.executable
    common = ["--redis-url", cfg.redis_url, "--prefix", cfg.prefix, "--model", cfg.model]
    compute = cfg.stages + (cfg.drafts if cfg.policy != "pp" else 0)
    threads = ["--threads", str(max(1, (os.cpu_count() or 1) // compute))]  # share the cores, don't oversubscribe
    procs = {
        "scheduler": [py, "-m", "scheduler", *common, "--policy", cfg.policy, "--stages", str(cfg.stages),
                      "--width", str(cfg.width), "--token-budget", str(cfg.token_budget), *cfg.extra],
    }
    for k in range(cfg.stages):
        procs[stage_name(k)] = [py, "-m", "stage_worker", *common, *threads, "--rank", str(k), "--world", str(cfg.stages),
                               "--master-port", str(cfg.master_port), *cfg.attention_args()]
    for i in range(cfg.drafts if cfg.policy != "pp" else 0):
        procs[f"draft-{i}"] = [py, "-m", "draft_worker", *common, *threads, "--draft", cfg.draft,
                               "--name", f"draft-{i}", "--dtype", cfg.draft_dtype]
    gateway = Path(__file__).resolve().parents[1] / "gateway" / "__main__.py"
    if gateway.exists():
        procs["gateway"] = [py, "-m", "gateway", "--redis-url", cfg.redis_url, "--prefix", cfg.prefix,
                            "--model", cfg.model, "--port", str(cfg.port), "--stages", str(cfg.stages),
                            "--attention", cfg.attention.kind]
        procs["batch-worker"] = [py, "-m", "gateway.batch_worker", "--redis-url", cfg.redis_url,  # Celery: /v1/batches
                                 "--prefix", cfg.prefix, "--model", cfg.model, "--stages", str(cfg.stages)]
    return procs


def up(cfg: ClusterConfig) -> int:
    from shared.model_store import resolve_model

    resolve_model(cfg.model, progress=True)  # convert once here, not in every child at the same time
    if cfg.draft != "ngram" and cfg.policy != "pp":
        resolve_model(cfg.draft, progress=True)
    redis_proc = ensure_redis(cfg.redis_url)
    children = {name: subprocess.Popen(cmd) for name, cmd in commands(cfg).items()}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rcfg = RedisConfig(cfg.redis_url, cfg.prefix)
    ready_reported = False
    try:
        while not stopping:
            dead = [n for n, p in children.items() if p.poll() is not None]
            if dead:
                print(f"specpipe up: {', '.join(dead)} exited; stopping the cluster", file=sys.stderr)
                return 1
            if not ready_reported and _ready(rcfg, cfg.stages):
                print(f"specpipe up: ready ({cfg.stages} stages, policy {cfg.policy}, model {cfg.model}, "
                      f"keys under '{cfg.prefix}:')", file=sys.stderr)
                ready_reported = True
            time.sleep(0.5)
        return 0
    finally:
        stop_processes(children.values(), signal.SIGINT)
        if redis_proc is not None:
            redis_proc.terminate()


def _ready(rcfg: RedisConfig, stages: int) -> bool:
    try:
        r = connect(rcfg)
        return all(alive(r, rcfg, n) for n in pipeline_components(stages))
    except Exception:
        return False


def free_port() -> int:
    """A free TCP port on loopback (for a gateway, a torch.distributed rendezvous, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    p = argparse.ArgumentParser(prog="specpipe up", description="start the local cluster")
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", default="ngram")
    p.add_argument("--policy", default="specpipe", choices=["pp", "tree", "specpipe"])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--drafts", type=int, default=1, help="draft worker processes")
    p.add_argument("--draft-dtype", choices=DTYPES, default="float32", help="the draft model's dtype")
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--prefix", default=os.environ.get("SPECPIPE_PREFIX", "specpipe"))
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29531")))
    add_attention_args(p)
    a = p.parse_args(argv)
    cfg = ClusterConfig(a.model, a.draft, a.policy, a.stages, a.width, a.drafts, a.token_budget, a.redis_url,
                        a.prefix, a.master_port, a.port, attention=attention_config(a), draft_dtype=a.draft_dtype)
    return up(cfg)
