"""Gateway test fixtures: real clusters (tests/cluster.py) and real `python -m gateway` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from specpipe.cluster import stop_processes, wait_until_answering
from tests.cluster import REDIS_URL, ROOT, Cluster, free_port

MODEL_NAME = "tiny-random"


class Gateway:
    """One `python -m gateway` process on a free loopback port; `url` is its base URL."""

    def __init__(self, tmp: Path, model: Path, prefix: str, *args: str, name: str = "gateway"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}-{self.port}.log"
        cmd = [sys.executable, "-m", "gateway", "--redis-url", REDIS_URL, "--prefix", prefix, "--model", str(model),
               "--served-model-name", MODEL_NAME, "--port", str(self.port), "--stages", "2", *args]
        env = {k: v for k, v in os.environ.items() if k != "SPECPIPE_API_KEYS"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     env=dict(env, PYTHONUNBUFFERED="1"))
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 60) -> None:
        try:
            wait_until_answering(self.url + "/health", {"gateway": self.proc}, timeout, poll_s=0.1)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}: {self.log()}") from exc

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        stop_processes([self.proc])


@pytest.fixture(scope="session")
def gw_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="session")
def cluster(gw_tmp, tiny_dir):
    """tiny-random, 2 stages, specpipe with tiny-random itself as the draft model (greedy drafts hit,
    so acceptance shows end to end; tiny-random's text never repeats, so n-grams would never hit). The pipe waits
    for the draft: under the default (auto) an unmeasured draft runs beside the pipe first, and on a loaded machine
    its first levels may come too late for a short request to accept any, which the metrics test needs. The
    width is the budget rule's fixed --width: the cost rule may price a short request's speculation out on a
    loaded machine (a run of 40 tokens then sends roots only and accepts nothing), and these tests are about
    the gateway, not the width plan (tests/scheduler covers it)."""
    c = Cluster(gw_tmp, str(tiny_dir), stages=2, policy="specpipe", draft=str(tiny_dir),
                extra=("--draft-mode", "wait", "--width-rule", "budget"))
    yield c
    c.close()


@pytest.fixture(scope="session")
def gateway(gw_tmp, tiny_dir, cluster):
    g = Gateway(gw_tmp, tiny_dir, cluster.cfg.prefix)
    yield g
    g.close()


@pytest.fixture(scope="session")
def keyed_gateway(gw_tmp, tiny_dir, cluster):
    g = Gateway(gw_tmp, tiny_dir, cluster.cfg.prefix, "--api-keys", "key-one,key-two", name="keyed")
    yield g
    g.close()


@pytest.fixture(scope="session")
def orphan_gateway(gw_tmp, tiny_dir):
    """A gateway whose prefix has no cluster at all: never ready."""
    g = Gateway(gw_tmp, tiny_dir, f"test-empty-{uuid.uuid4().hex[:8]}", name="orphan")
    yield g
    g.close()


@pytest.fixture
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=120) as c:
        yield c
