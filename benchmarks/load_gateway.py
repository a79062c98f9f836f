"""Load test of the gateway: many concurrent streaming clients against a local cluster, loopback only.

    python -m benchmarks.load_gateway [--model smollm2-135m] [--clients 64] [--requests 256] [--max-tokens 16]
        [--max-queue N] [--kv-slots N] [--max-inflight N] [--duration 300] [--deadline 120] [--out report.md]
        [--url http://127.0.0.1:8000]

Without --url it starts the default local cluster itself (specpipe.cluster.commands: scheduler with the n-gram
draft, 2 stages, gateway; its own key prefix and ports), and stops it and deletes its keys at the end;
--max-queue, --kv-slots and --max-inflight are its service limits, LoadConfig.gateway_args more gateway flags.
`--clients` asyncio clients (httpx, one connection each: `--clients 512` is 512 concurrent streams) each send
streaming chat completions one after another until `--requests` have been sent in all or `--duration`
seconds have passed; a 429 is counted and its Retry-After honoured. Every request must either complete in
full (the stream ends with a finish_reason and [DONE]) or get a clean 429 (OpenAI error object, code
queue_full from the scheduler or too_many_requests from the gateway's --max-inflight, Retry-After):
sent == completed + 429. Anything else is lost, counted by kind: other 4xx, 5xx, hung (no end within
`--deadline` seconds), transport errors (connect, reset, protocol), error events in a stream, and
streams that ended without [DONE].

Added latency is read from the gateway's own histogram `specpipe:gateway_added_latency_seconds`
(gateway/latency.py; the difference of two /metrics scrapes, quantiles interpolated within buckets as
Prometheus' histogram_quantile does): round_trip = (HTTP request in -> RequestMsg published) + (TokensMsg
in the out stream -> its first SSE chunk written), i.e. gateway in -> Redis -> gateway out without the
model's time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from benchmarks.provenance import machine
from benchmarks.stats import pct
from shared.environment import DEFAULTS
from shared.transport.redis_io import ensure_redis
from specpipe.cluster import (
    ClusterConfig,
    ServiceLimits,
    commands,
    delete_keys,
    free_port,
    spawn,
    stop_processes,
    wait_until_answering,
)

PROMPTS = ["What is the capital of France?", "Write a haiku about pipelines.", "Explain speculative decoding.",
           "List three prime numbers.", "What does Redis do?", "Summarize the plot of Hamlet in one line."]
METRIC = "specpipe:gateway_added_latency_seconds"
SAMPLE = re.compile(METRIC + r'_bucket\{([^}]*)\} (\S+)')


@dataclass(frozen=True)
class LoadConfig:
    model: str = "smollm2-135m"
    stages: int = 2
    clients: int = 64
    requests: int = 256
    max_tokens: int = 16
    max_queue: int | None = None
    kv_slots: int | None = None
    duration_s: float = 300.0
    request_timeout_s: float = 120.0  # a request with no end within this is counted as hung
    threads: int | None = 1  # OMP/MKL threads per cluster process (None: torch's default, one per core)
    url: str | None = None
    redis_url: str = DEFAULTS["REDIS_URL"]
    max_inflight: int | None = None  # the gateway's --max-inflight (None: its default)
    gateway_args: tuple[str, ...] = ()  # more flags for the started gateway


LOST_KINDS = ("other_4xx", "server_5xx", "hung", "transport", "stream_error", "incomplete")


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    rejected: int = 0  # clean 429s
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    lost: list[str] = field(default_factory=list)
    lost_by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOST_KINDS, 0))
    ttft_s: list[float] = field(default_factory=list)

    def lose(self, kind: str, i: int, what: str) -> float:
        self.lost_by_kind[kind] += 1
        self.lost.append(f"#{i}: {kind}: {what}")
        return 0.0


# ---- the cluster -------------------------------------------------------------------------------------------
def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if not (host == "localhost" or host == "::1" or host.startswith("127.")):
        raise SystemExit(f"error: load tests only target loopback addresses, not {host!r}")


class LocalCluster:
    """The processes of specpipe.cluster.commands (without the batch worker), with a fresh prefix and ports."""

    def __init__(self, cfg: LoadConfig, log_dir: Path):
        limits = {k: v for k, v in (("max_queue", cfg.max_queue), ("kv_slots", cfg.kv_slots),
                                    ("max_inflight", cfg.max_inflight)) if v}  # None or 0: the service's default
        self.prefix, self.port = f"load-{uuid.uuid4().hex[:8]}", free_port()
        ccfg = ClusterConfig(model=cfg.model, stages=cfg.stages, redis_url=cfg.redis_url, prefix=self.prefix,
                             master_port=free_port(), port=self.port, limits=ServiceLimits(**limits))
        self.redis_url, self.url, self.log_dir = cfg.redis_url, f"http://127.0.0.1:{self.port}", log_dir
        self.redis_proc = ensure_redis(cfg.redis_url)
        # every stage at the default (a thread per core) oversubscribes a small host badly
        env = {"OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)} if cfg.threads else {}
        cmds = {name: cmd for name, cmd in commands(ccfg).items() if name != "batch-worker"}
        cmds["gateway"] = [*cmds["gateway"], *cfg.gateway_args]  # argparse: a later flag wins
        self.procs = {name: spawn(cmd, log_dir / f"{name}.log", **env) for name, cmd in cmds.items()}

    def wait_ready(self, timeout_s: float = 300) -> None:
        try:
            wait_until_answering(self.url + "/ready", self.procs, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}; logs in {self.log_dir}") from exc

    def close(self) -> None:
        import redis

        stop_processes(self.procs.values())
        delete_keys(redis.Redis.from_url(self.redis_url), self.prefix)
        if self.redis_proc is not None:
            self.redis_proc.terminate()


# ---- the clients -------------------------------------------------------------------------------------------
REJECT_CODES = ("queue_full", "too_many_requests")  # the scheduler's queue, the gateway's --max-inflight


async def one_request(client: httpx.AsyncClient, i: int, cfg: LoadConfig, model: str, tally: Tally) -> float:
    """Send one streaming chat completion; count its outcome; return the seconds to wait before the next."""
    body = {"model": model, "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (#{i})"}],
            "max_tokens": cfg.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return await _refused(r, i, tally)
                return await _events(r, i, tally, time.monotonic())
    except TimeoutError:
        return tally.lose("hung", i, f"no end within {cfg.request_timeout_s:g} s")
    except httpx.TimeoutException as exc:
        return tally.lose("hung", i, f"{type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        return tally.lose("transport", i, f"{type(exc).__name__}: {exc}")


def _error_code(raw: bytes) -> str | None:
    """The `code` of an OpenAI error object; None when the body is not one."""
    try:
        error = json.loads(raw)["error"]
        return error["code"] if {"message", "type", "param", "code"} <= set(error) else None
    except (ValueError, KeyError, TypeError):
        return None


async def _refused(r: httpx.Response, i: int, tally: Tally) -> float:
    """A non-200 answer: a clean 429 (OpenAI error, a known code, Retry-After) or a lost request."""
    raw = await r.aread()
    code, retry_after = _error_code(raw), r.headers.get("Retry-After")
    if r.status_code == 429 and code in REJECT_CODES and retry_after:
        tally.rejected += 1
        tally.rejected_by_code[code] = tally.rejected_by_code.get(code, 0) + 1
        return float(retry_after)
    kind = "server_5xx" if r.status_code >= 500 else "other_4xx"
    return tally.lose(kind, i, f"HTTP {r.status_code} (Retry-After {retry_after}): {raw[:200]!r}")


async def _events(r: httpx.Response, i: int, tally: Tally, start: float) -> float:
    """Read an SSE stream to its end: completed in full (a finish_reason, then [DONE]) or lost."""
    first, finish, done = None, None, False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return tally.lose("stream_error", i, f"error event {chunk['error']}")
        if chunk.get("usage"):
            tally.tokens += chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            first = first if first is not None else time.monotonic() - start
            finish = choice.get("finish_reason") or finish
    if done and finish in ("stop", "length"):
        tally.completed += 1
        tally.ttft_s.append(first or 0.0)
        return 0.0
    return tally.lose("incomplete", i, f"stream ended without a finish_reason and [DONE] ({finish}, {done})")


async def run_clients(url: str, cfg: LoadConfig, model: str) -> tuple[Tally, float]:
    """`cfg.clients` concurrent clients until `cfg.requests` are sent or `cfg.duration_s` passed."""
    tally, counter, deadline = Tally(), iter(range(cfg.requests)), time.monotonic() + cfg.duration_s
    limits = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients)
    timeout = httpx.Timeout(cfg.request_timeout_s + 10, connect=30)  # the per-request deadline comes first

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:  # shared: every request index is sent once
            if time.monotonic() >= deadline:
                return
            tally.sent += 1
            wait = await one_request(client, i, cfg, model, tally)
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(cfg.clients)))
    return tally, time.monotonic() - start


# ---- the gateway's histogram -------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, list[tuple[float, float]]]:
    """component -> [(le, cumulative count)] of the added-latency histogram."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, list[tuple[float, float]]] = {}
    for labels, value in SAMPLE.findall(text):
        parts = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        le = float("inf") if parts["le"] == "+Inf" else float(parts["le"])
        out.setdefault(parts["component"], []).append((le, float(value)))
    return out


def delta(after: dict, before: dict) -> dict[str, list[tuple[float, float]]]:
    return {c: [(le, n - dict(before.get(c, [])).get(le, 0.0)) for le, n in buckets] for c, buckets in after.items()}


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """histogram_quantile: linear interpolation inside the bucket holding the q-th sample."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / max(cumulative - below, 1e-12))
        lower, below = le, cumulative
    return lower


# ---- the report --------------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.1f} ms"


def summarize(cfg: LoadConfig, tally: Tally, wall_s: float, hist: dict) -> dict:
    q = {c: {p: quantile(hist.get(c, []), p / 100) for p in (50, 99)} for c in ("round_trip", "submit", "deliver")}
    ttft = sorted(tally.ttft_s)
    return {
        "machine": machine(), "model": cfg.model, "stages": cfg.stages, "clients": cfg.clients,
        "max_tokens": cfg.max_tokens, "max_queue": cfg.max_queue, "threads": cfg.threads if cfg.url is None else None,
        "max_inflight": cfg.max_inflight, "deadline_s": cfg.request_timeout_s,
        "sent": tally.sent, "completed": tally.completed, "rejected_429": tally.rejected,
        "rejected_by_code": dict(tally.rejected_by_code), **tally.lost_by_kind,
        "lost": len(tally.lost), "lost_examples": tally.lost[:5], "wall_s": wall_s,
        "requests_per_s": tally.completed / wall_s if wall_s else 0.0,
        "tokens_per_s": tally.tokens / wall_s if wall_s else 0.0, "added": q,
        "samples": {c: int(b[-1][1]) if b else 0 for c, b in hist.items()},
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": pct(ttft, 99),
    }


def report(s: dict) -> str:
    a = s["added"]
    rows = [
        ("machine", s["machine"]), ("model / stages", f"{s['model']} / {s['stages']}"),
        ("clients (concurrent, streaming)", s["clients"]), ("max_tokens per request", s["max_tokens"]),
        ("scheduler --max-queue", s["max_queue"] or "default (256)"),
        ("threads per cluster process", s["threads"] or "torch default"), ("requests sent", s["sent"]),
        ("gateway --max-inflight", s["max_inflight"] or "default (256)"),
        ("completed in full", s["completed"]),
        ("429 (clean: OpenAI error + Retry-After)", f"{s['rejected_429']} "
         f"({', '.join(f'{k} {n}' for k, n in sorted(s['rejected_by_code'].items())) or 'none'})"),
        ("lost", s["lost"]),
        ("  other 4xx / 5xx", f"{s['other_4xx']} / {s['server_5xx']}"),
        (f"  hung (no end within {s['deadline_s']:g} s)", s["hung"]),
        ("  transport errors", s["transport"]),
        ("  error events in a stream / streams without [DONE]", f"{s['stream_error']} / {s['incomplete']}"),
        ("**added latency p50 / p99** (in -> Redis -> out)",
         f"**{_ms(a['round_trip'][50])} / {_ms(a['round_trip'][99])}**"),
        ("  submit p50 / p99 (HTTP in -> RequestMsg published)", f"{_ms(a['submit'][50])} / {_ms(a['submit'][99])}"),
        ("  deliver p50 / p99 (TokensMsg XADD -> SSE chunk written)",
         f"{_ms(a['deliver'][50])} / {_ms(a['deliver'][99])}"),
        ("client TTFT p50 / p99 (model time included)", f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p99_s'])}"),
        ("throughput", f"{s['requests_per_s']:.2f} req/s, {s['tokens_per_s']:.1f} tokens/s over {s['wall_s']:.1f} s"),
    ]
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if s["lost_examples"]:
        lines += ["", "Lost requests (first 5):", *(f"- {x}" for x in s["lost_examples"])]
    return "\n".join(lines) + "\n"


def warm_up(url: str, model: str, tries: int = 10) -> None:
    """A fresh cluster's first steps are slow (they can outlast a heartbeat and fail their requests):
    send small requests until one completes, then wait for /ready, before measuring anything."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    for _ in range(tries):
        try:
            if httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    else:
        raise RuntimeError(f"the cluster did not answer a single request in {tries} tries")
    deadline = time.monotonic() + 30
    while httpx.get(url + "/ready", timeout=5).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)


def run(cfg: LoadConfig, log_dir: Path | None = None) -> dict:
    """Start the cluster (unless cfg.url), run the clients, return the summary (see `summarize`)."""
    cluster = None
    if cfg.url is None:
        from shared.model_store import resolve_model

        resolve_model(cfg.model, progress=True)  # convert once, before the processes start
        cluster = LocalCluster(cfg, log_dir or Path(tempfile.mkdtemp(prefix="load-gateway-")))
    try:
        url = cfg.url or cluster.url
        _check_loopback(url)
        if cluster is not None:
            cluster.wait_ready()
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        warm_up(url, model)
        before = scrape(url)
        tally, wall = asyncio.run(run_clients(url, cfg, model))
        return summarize(cfg, tally, wall, delta(scrape(url), before))
    finally:
        if cluster is not None:
            cluster.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_gateway", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256, help="requests in all (bounded)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=None, help="scheduler --max-queue (small: exercise 429)")
    p.add_argument("--kv-slots", type=int, default=None, help="scheduler --kv-slots (bounds running requests)")
    p.add_argument("--max-inflight", type=int, default=None, help="the started gateway's --max-inflight")
    p.add_argument("--duration", type=float, default=300.0, help="stop sending after this many seconds")
    p.add_argument("--deadline", type=float, default=120.0, help="a request with no end after this is hung")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per cluster process (0: torch's default)")
    p.add_argument("--url", default=None, help="an already running gateway (loopback only)")
    p.add_argument("--out", default=None, help="write the markdown report here too")
    a = p.parse_args(argv)
    cfg = LoadConfig(a.model, a.stages, a.clients, a.requests, a.max_tokens, a.max_queue, a.kv_slots, a.duration,
                     url=a.url, threads=a.threads or None, max_inflight=a.max_inflight, request_timeout_s=a.deadline)
    summary = run(cfg)
    text = report(summary)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
