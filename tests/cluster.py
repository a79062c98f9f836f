"""A real local cluster for multi-process tests: Redis, scheduler, stages, draft workers.

Every cluster uses its own key prefix and master port, and deletes its keys at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from shared.transport.redis_io import RedisConfig, alive, connect, ensure_redis, pipeline_components, stage_name
from specpipe.cluster import delete_keys, free_port, stop_processes  # noqa: F401 (free_port: re-exported)

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/0"


class Cluster:
    def __init__(self, tmp: Path, model: str, stages: int = 2, policy: str = "specpipe", draft: str = "ngram",
                 drafts: int = 1, extra: tuple[str, ...] = (), prefix: str | None = None):
        self.redis_proc = ensure_redis(REDIS_URL)
        self.cfg = RedisConfig(url=REDIS_URL, prefix=prefix or f"test-{uuid.uuid4().hex[:8]}")
        self.r = connect(self.cfg)
        self.tmp, self.model, self.stages, self.draft = tmp, model, stages, draft
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[str, ...]] = {}
        common = ["--redis-url", REDIS_URL, "--prefix", self.cfg.prefix, "--model", model]
        self._spawn("scheduler", "scheduler", *common, "--stages", str(stages), "--policy", policy, *extra)
        for k in range(stages):  # stage 0 picks its rendezvous port per run (shared through Redis)
            self._spawn(stage_name(k), "stage_worker", *common, "--threads", "1", "--rank", str(k),
                        "--world", str(stages))
        for i in range(drafts if policy != "pp" else 0):
            self.add_draft_worker(f"draft-{i}")
        self.wait_ready()

    def _spawn(self, name: str, module: str, *args: str) -> None:
        log = open(self.tmp / f"{self.cfg.prefix}-{name}.log", "a")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.commands[name] = (module, *args)
        self.procs[name] = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)

    def restart(self, name: str) -> None:
        """Start a process again with its command line (what a supervisor does); its log goes on."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        self._spawn(name, *self.commands[name])

    def add_draft_worker(self, name: str) -> None:
        self._spawn(name, "draft_worker", "--redis-url", REDIS_URL, "--prefix", self.cfg.prefix,
                    "--model", self.model, "--draft", self.draft, "--name", name, "--threads", "1")

    def wait_ready(self, timeout: float = 120) -> None:
        names = pipeline_components(self.stages)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited: {self.log(name)}"
            if all(alive(self.r, self.cfg, n) for n in names):
                return
            time.sleep(0.2)
        raise TimeoutError("cluster did not become ready: " + " | ".join(self.log(n)[-300:] for n in names))

    def log(self, name: str) -> str:
        return (self.tmp / f"{self.cfg.prefix}-{name}.log").read_text()

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def running(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.procs.items()}

    def close(self, keep_keys: bool = False) -> None:
        """Stop every process; keep_keys leaves the prefix's keys as a stopped cluster leaves them."""
        stop_processes(self.procs.values())
        if not keep_keys:
            delete_keys(self.r, self.cfg.prefix)
        if self.redis_proc is not None:
            self.redis_proc.terminate()
