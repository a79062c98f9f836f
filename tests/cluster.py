"""A real local cluster for multi-process tests: Redis, scheduler, stages, draft workers.

Every cluster uses its own key prefix and master port, and deletes its keys at the end.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

from shared.environment import DEFAULTS
from shared.transport.redis_io import RedisConfig, alive, connect, ensure_redis, pipeline_components
from specpipe.cluster import (  # noqa: F401 (free_port: re-exported)
    ClusterConfig,
    delete_keys,
    draft_command,
    free_port,
    pipeline_commands,
    spawn,
    stop_processes,
)

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = DEFAULTS["REDIS_URL"]


class Cluster:
    """specpipe.cluster's processes without the HTTP front (scheduler, stages, draft workers), one torch thread
    each; `cfg` is the cluster's RedisConfig, `config` its ClusterConfig."""

    def __init__(self, tmp: Path, model: str, stages: int = 2, policy: str = "specpipe", draft: str = "ngram",
                 drafts: int = 1, extra: tuple[str, ...] = (), prefix: str | None = None, numerics: str = "exact",
                 ngram_shared: int = 0, ngram_in: str = "auto"):
        self.redis_proc = ensure_redis(REDIS_URL)
        self.cfg = RedisConfig(url=REDIS_URL, prefix=prefix or f"test-{uuid.uuid4().hex[:8]}")
        self.r = connect(self.cfg)
        self.tmp, self.model, self.stages, self.draft = tmp, model, stages, draft
        # stage 0 picks its rendezvous port per run (master port 0, shared through Redis)
        # on the CPU in fp32, exact numerics unless asked (the lossless promise), even where a GPU is seen: the
        # references they are checked against are
        self.config = ClusterConfig(model=model, draft=draft, policy=policy, stages=stages, drafts=drafts,
                                    redis_url=REDIS_URL, prefix=self.cfg.prefix, extra=tuple(extra), threads=1,
                                    device="cpu", numerics=numerics, ngram_shared=ngram_shared,
                                    ngram_in=ngram_in)
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands = pipeline_commands(self.config)
        for name in self.commands:
            self._spawn(name)
        self.wait_ready()

    def _spawn(self, name: str) -> None:
        self.procs[name] = spawn(self.commands[name], self.tmp / f"{self.cfg.prefix}-{name}.log", cwd=ROOT)

    def restart(self, name: str) -> None:
        """Start a process again with its command line (what a supervisor does); its log goes on."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        self._spawn(name)

    def add_draft_worker(self, name: str) -> None:
        self.commands[name] = draft_command(self.config, name)
        self._spawn(name)

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
