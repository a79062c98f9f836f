"""Redis transport: stream names, publish/read of schema'd messages, heartbeats.

Only this module and the services' loops touch Redis; the scheduler, the stage
runner and the draft sources stay transport-free.
"""

from __future__ import annotations

import logging
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import redis
from redis.client import Pipeline

from shared.environment import DEFAULTS
from shared.types.errors import ConfigError, ProtocolError
from shared.wire.messages import Message, decode

log = logging.getLogger(__name__)


SCHEDULER_GROUP = "schedulers"  # the scheduler's consumer group on `requests`; the gateway reads its pending entries


@dataclass(frozen=True)
class RedisConfig:
    url: str = DEFAULTS["REDIS_URL"]
    prefix: str = DEFAULTS["SPECPIPE_PREFIX"]  # every key and stream starts with it: tests use their own
    heartbeat_ttl_s: float = 5.0  # a component is lost when its heartbeat is older than this

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def requests(self) -> str:
        return self.key("requests")

    @property
    def steps(self) -> str:
        """A trace of the StepMsgs (scheduler --trace-steps): they travel over the control path, not here."""
        return self.key("steps")

    @property
    def draft_events(self) -> str:
        return self.key("draft_events")

    @property
    def draft_jobs(self) -> str:
        return self.key("draft_jobs")

    @property
    def errors(self) -> str:
        return self.key("errors")

    @property
    def cancel(self) -> str:
        return self.key("cancel")

    @property
    def occupancy(self) -> str:
        return self.key("occupancy")

    @property
    def stats(self) -> str:
        return self.key("stats")

    def stage_stats(self, component: str) -> str:
        """A stage's StageStatsMsg snapshot (the scheduler's is `stats`)."""
        return self.key("stats", component)

    @property
    def epoch(self) -> str:
        return self.key("epoch")

    @property
    def pipeline(self) -> str:
        return self.key("pipeline")

    def rendezvous(self, epoch: int) -> str:
        return self.key("rdzv", str(epoch))

    def control(self, component: str) -> str:
        return self.key("control", component)

    def joined(self, component: str) -> str:
        return self.key("joined", component)

    def out(self, request_id: str) -> str:
        return self.key("out", request_id)

    def heartbeat(self, component: str) -> str:
        return self.key("hb", component)


def connect(cfg: RedisConfig) -> redis.Redis:
    return redis.Redis.from_url(cfg.url, socket_timeout=None, health_check_interval=30)


def publish(r: redis.Redis, stream: str, msg: Message, maxlen: int | None = 100_000) -> str:
    entry = r.xadd(stream, {"m": msg.encode()}, maxlen=maxlen, approximate=True)
    return entry.decode() if isinstance(entry, bytes) else entry


def publish_all(r: redis.Redis | Pipeline, messages: list[tuple[str, Message]], maxlen: int | None = 100_000) -> None:
    """XADD every (stream, message) in one round trip, in order (a step's tokens, a round's jobs); given a
    pipeline, only queue them there (its caller's round trip carries them)."""
    if not messages:
        return
    pipe = r if isinstance(r, Pipeline) else r.pipeline(transaction=False)
    for stream, msg in messages:
        pipe.xadd(stream, {"m": msg.encode()}, maxlen=maxlen, approximate=True)
    if pipe is not r:
        pipe.execute()


def read(r: redis.Redis, stream: str, last_id: str, block_ms: int | None, count: int = 256):
    """[(entry_id, raw bytes)] after last_id; block_ms=None returns at once."""
    return entries_of(r.xread({stream: last_id}, count=count, block=block_ms))


def entries_of(reply) -> list[tuple[str, bytes]]:
    """An XREAD / XREADGROUP reply as [(entry_id, raw bytes)] (what read() returns)."""
    return [(eid.decode(), (fields or {}).get(b"m", b"")) for _, entries in reply or [] for eid, fields in entries]


def tail_id(r: redis.Redis, stream: str) -> str:
    """The id of a stream's last entry ("0" when empty): read after it to skip everything already there."""
    last = r.xrevrange(stream, count=1)
    return last[0][0].decode() if last else "0"


def decode_or_log(raw: bytes, expect: type[Message], where: str) -> Message | None:
    """Decode a message; a malformed one is logged and dropped (never raised)."""
    try:
        return decode(raw, expect)
    except ProtocolError as exc:
        log.warning("%s: dropped malformed message: %s", where, exc)
        return None


def ensure_group(r: redis.Redis, stream: str, group: str, start_id: str) -> None:
    """Create a consumer group (and its stream) unless it exists."""
    try:
        r.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def beat(r: redis.Redis, cfg: RedisConfig, component: str) -> None:
    r.set(cfg.heartbeat(component), time.time(), px=int(cfg.heartbeat_ttl_s * 1000))


def stage_name(rank: int) -> str:
    """The component name of pipeline stage `rank` (its heartbeat, its timings)."""
    return f"stage-{rank}"


def pipeline_components(stages: int) -> list[str]:
    """Components whose heartbeats mean the pipeline can serve: the scheduler and every stage."""
    return ["scheduler", *(stage_name(k) for k in range(stages))]


def start_heartbeat(cfg: RedisConfig, component: str) -> threading.Event:
    """Beat from a daemon thread (own connection), so a long step never looks like a lost process.

    Set the returned event to stop beating.
    """
    stop = threading.Event()
    r = connect(cfg)

    def loop() -> None:
        while not stop.is_set():
            try:
                beat(r, cfg, component)
            except redis.RedisError as exc:
                log.warning("heartbeat of %s failed: %s", component, exc)
            stop.wait(cfg.heartbeat_ttl_s / 3)

    threading.Thread(target=loop, name=f"heartbeat-{component}", daemon=True).start()
    return stop


class OffBeatWriter:
    """Redis writes from a daemon thread (own connection), in the order given: what a stage reports between
    steps (timings, stats snapshots) never puts a Redis round trip between one step's compute and the next.
    A failed write is logged and dropped (monitoring only: nothing on the beat depends on it)."""

    def __init__(self, cfg: RedisConfig, component: str):
        self.r = connect(cfg)
        self.writes: queue.SimpleQueue[Callable[[redis.Redis], object]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"writer-{component}", daemon=True).start()

    def submit(self, write: Callable[[redis.Redis], object]) -> None:
        self.writes.put(write)

    def _run(self) -> None:
        while True:
            write = self.writes.get()
            try:
                write(self.r)
            except redis.RedisError as exc:
                log.warning("a write off the beat failed: %s", exc)


def alive(r: redis.Redis, cfg: RedisConfig, component: str) -> bool:
    return r.exists(cfg.heartbeat(component)) == 1


def not_alive(r: redis.Redis, cfg: RedisConfig, components: list[str]) -> list[str]:
    """The components without a live heartbeat, in one round trip."""
    with r.pipeline(transaction=False) as pipe:
        for name in components:
            pipe.exists(cfg.heartbeat(name))
        found = pipe.execute()
    return [name for name, n in zip(components, found) if not n]


def any_alive(r: redis.Redis, cfg: RedisConfig, component_prefix: str) -> bool:
    return next(r.scan_iter(cfg.heartbeat(component_prefix) + "*", count=100), None) is not None


def ensure_redis(url: str, start: bool = True, daemonize: bool = False) -> subprocess.Popen | None:
    """Ping Redis at url; if nothing answers on a loopback address, start a local redis-server.

    Returns the child process (None if Redis was already there or daemonized).
    """
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
        return None
    except redis.ConnectionError:
        pass
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if not start or host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"no Redis answers at {url}")
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(f"no Redis answers at {url} and redis-server is not installed")
    args = [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        args + (["--daemonize", "yes"] if daemonize else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return None if daemonize else proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise ConfigError(f"started redis-server on {host}:{port} but it does not answer")


if __name__ == "__main__":  # `python -m shared.transport.redis_io [URL]`: make sure a Redis answers (used by make)
    import sys

    ensure_redis(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0", daemonize=True)
