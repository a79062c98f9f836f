"""Two "hosts" on this machine: network namespaces joined by a veth pair, each with its own address.

Made and removed by `TwoHosts` (as root, with `ip netns`); `python -m tests.multiproc.two_hosts client ...`
is the client the test runs inside host A, where Redis and the gateway are (nothing outside the namespaces
reaches them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import uuid

HOST_A, HOST_B = "10.231.0.1", "10.231.0.2"


def can_make_namespaces() -> str | None:
    """None when this process may make network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"sp-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


class TwoHosts:
    """Namespaces a and b, a veth pair between them (HOST_A, HOST_B on a /24), loopback up in each."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.a, self.b = f"spa-{tag}", f"spb-{tag}"
        va, vb = f"va{tag}", f"vb{tag}"
        steps = [["netns", "add", self.a], ["netns", "add", self.b],
                 ["link", "add", va, "type", "veth", "peer", "name", vb],
                 ["link", "set", va, "netns", self.a], ["link", "set", vb, "netns", self.b],
                 ["-n", self.a, "addr", "add", f"{HOST_A}/24", "dev", va],
                 ["-n", self.b, "addr", "add", f"{HOST_B}/24", "dev", vb],
                 ["-n", self.a, "link", "set", va, "up"], ["-n", self.b, "link", "set", vb, "up"],
                 ["-n", self.a, "link", "set", "lo", "up"], ["-n", self.b, "link", "set", "lo", "up"]]
        try:
            for step in steps:
                subprocess.run(["ip", *step], check=True, capture_output=True)
        except subprocess.CalledProcessError:
            self.close()
            raise

    def command(self, host: str, argv: list[str]) -> list[str]:
        """argv run inside namespace a or b."""
        return ["ip", "netns", "exec", {"a": self.a, "b": self.b}[host], *argv]

    def close(self) -> None:
        for ns in (self.a, self.b):  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def client(args: argparse.Namespace) -> None:
    """Inside host A: the jobs through the queue, one completion through the gateway; JSON on stdout."""
    import httpx

    from shared.transport.queue_client import collect, submit
    from shared.transport.redis_io import RedisConfig, connect
    from shared.wire.messages import RequestMsg, SamplingFields

    cfg = RedisConfig(url=args.redis_url, prefix=args.prefix)
    r = connect(cfg)
    jobs = json.loads(args.jobs)
    for i, (prompt, n, t, p, k, seed) in enumerate(jobs):
        submit(r, cfg, RequestMsg(f"job{i}", prompt, n, SamplingFields(t, p, k, seed)))
    tokens = [collect(r, cfg, f"job{i}", timeout_s=120).tokens for i in range(len(jobs))]
    reply = httpx.post(f"{args.gateway}/v1/completions", timeout=120,
                       json={"model": args.model, "prompt": "Hello from host A", "max_tokens": 8, "temperature": 0})
    print(json.dumps({"tokens": tokens, "http_status": reply.status_code, "http": reply.json()}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tests.multiproc.two_hosts")
    p.add_argument("role", choices=["client"])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--gateway", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--jobs", required=True, help="JSON list of (prompt, n, temperature, top_p, top_k, seed)")
    client(p.parse_args(sys.argv[1:]))
