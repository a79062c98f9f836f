"""A pipeline over two hosts, for real: stage 1 in its own network namespace, reached only through a veth pair.

Host A (10.231.0.1) runs Redis, the gateway, the scheduler, stage 0 and the draft worker; host B (10.231.0.2)
runs stage 1. Every address a peer needs is given as that host's own (`--control-host`, `--master-addr`),
so the test fails if any process still reaches another over loopback. The outputs must be token for token
the single-host cluster's (plain decoding, same seeds). Needs root and `ip netns`: `make test-hosts` runs it
alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from shared.transport.redis_io import stage_name
from specpipe.cluster import ClusterConfig, commands, spawn, stop_processes
from tests.cluster import ROOT
from tests.multiproc.conftest import JOBS, reference
from tests.multiproc.two_hosts import HOST_A, HOST_B, TwoHosts, can_make_namespaces

pytestmark = pytest.mark.multiproc
WHY_NOT = can_make_namespaces()
REDIS_PORT, GATEWAY_PORT = 6379, 8000  # inside host A's namespace: nothing else listens there


@pytest.fixture
def hosts():
    if WHY_NOT is not None:
        pytest.skip(f"cannot make network namespaces here ({WHY_NOT}); `make test-hosts` runs this as root")
    made = TwoHosts()
    yield made
    made.close()


def _host_commands(cfg: ClusterConfig) -> dict[str, tuple[str, list[str]]]:
    """name -> (host, command line): specpipe.cluster's commands, each told its own host's address."""
    on_a = ["--control-host", HOST_A, "--master-addr", HOST_A]
    placed = {"scheduler": ("a", ["--control-host", HOST_A]), stage_name(0): ("a", on_a),
              stage_name(1): ("b", ["--control-host", HOST_B, "--master-addr", HOST_A]), "draft-0": ("a", []),
              "gateway": ("a", [])}
    cmds = commands(cfg)
    return {name: (host, cmds[name] + extra) for name, (host, extra) in placed.items() if name in cmds}


def test_two_hosts_serve_token_identical_to_one(hosts, tiny_dir, tmp_path) -> None:
    password = uuid.uuid4().hex  # Redis refuses another host's clients unless it has one (protected mode)
    redis_url = f"redis://:{password}@{HOST_A}:{REDIS_PORT}/0"
    cfg = ClusterConfig(model=str(tiny_dir), draft="ngram", policy="specpipe", stages=2, redis_url=redis_url,
                        prefix=f"hosts-{uuid.uuid4().hex[:6]}", threads=1, device="cpu", numerics="exact",
                        host=HOST_A, port=GATEWAY_PORT)
    procs = [subprocess.Popen(hosts.command("a", ["redis-server", "--bind", HOST_A, "--port", str(REDIS_PORT),
                                                  "--requirepass", password, "--save", "", "--appendonly", "no"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for name, (host, cmd) in _host_commands(cfg).items():
            procs.append(spawn(hosts.command(host, cmd), tmp_path / f"{name}.log", cwd=ROOT))
        client = hosts.command("a", [sys.executable, "-m", "tests.multiproc.two_hosts", "client", "--redis-url",
                                     redis_url, "--prefix", cfg.prefix, "--gateway", f"http://{HOST_A}:{GATEWAY_PORT}",
                                     "--model", str(tiny_dir), "--jobs", json.dumps(JOBS)])
        out = subprocess.run(client, check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
        logs = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*.log")}
        assert out.returncode == 0, f"{out.stderr[-2000:]}\n{logs}"
        got = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        stop_processes(procs)
    assert got["tokens"] == [reference(tiny_dir, *job) for job in JOBS]
    assert got["http_status"] == 200, got["http"]
    assert got["http"]["usage"]["completion_tokens"] == 8 and got["http"]["choices"][0]["finish_reason"] == "length"
    assert "joined run" in (tmp_path / f"{stage_name(1)}.log").read_text()
