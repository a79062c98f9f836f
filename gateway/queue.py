"""The gateway's side of the Redis streams, with redis.asyncio (no blocking call in the event loop).

Async equivalents of shared/transport/redis_io.py's publish/read/alive for the streams the
gateway uses: it writes `requests` and `cancel`, reads `out:{request}`, the stats snapshots
(`stats`, `stats:stage-k`) and checks the `hb:{component}` heartbeat keys.

Connections do not grow with load: short calls share a bounded pool (a caller
waits for a free connection, up to POOL_WAIT_S, rather than failing), and the out
streams of all in-flight requests are read by one multiplexing reader with its
own connection (gateway/outstreams.py; `follow` subscribes a request to it).
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.outstreams import OutStreams, Subscription, decode_entries
from shared.transport.redis_io import SCHEDULER_GROUP, RedisConfig, decode_or_log, pipeline_components, stage_name
from shared.wire.messages import (
    CancelMsg,
    Message,
    OccupancyMsg,
    RequestMsg,
    SchedulerStatsMsg,
    StageStatsMsg,
    TokensMsg,
)

log = logging.getLogger("gateway")

QueueError = RedisError  # what callers catch when Redis is unreachable or answers an error
POOL_SIZE = 16
POOL_WAIT_S = 10.0  # longest wait for a free pooled connection before QueueError


class AsyncQueue:
    """A bounded connection pool and the out-stream reader; every method only awaits network I/O."""

    def __init__(self, cfg: RedisConfig, stages: int, pool_size: int = POOL_SIZE):
        self.cfg, self.stages = cfg, stages
        pool = aioredis.BlockingConnectionPool.from_url(cfg.url, max_connections=pool_size, timeout=POOL_WAIT_S,
                                                        socket_connect_timeout=2, health_check_interval=30,
                                                        client_name=cfg.key("gateway"))  # CLIENT LIST shows it
        self.r = aioredis.Redis.from_pool(pool)
        self.outs = OutStreams(cfg, self.r)

    async def close(self) -> None:
        await self.outs.close()
        await self.r.aclose()

    async def _publish(self, stream: str, msg: Message, maxlen: int = 100_000) -> str:
        entry_id = await self.r.xadd(stream, {"m": msg.encode()}, maxlen=maxlen, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    async def submit(self, msg: RequestMsg) -> str | None:
        """Publish the request; its entry id in `requests` (None when it was not published now)."""
        return await self._publish(self.cfg.requests, msg)

    async def queue_time(self, entry_id: str) -> float | None:
        """Seconds from the request's XADD to the scheduler's read of it (both on the Redis clock: the entry id's
        time, and TIME minus the entry's idle time in the scheduler group's pending list); None once the
        scheduler has acknowledged it (the request ended) or if it never read it."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.xpending_range(self.cfg.requests, SCHEDULER_GROUP, entry_id, entry_id, 1)
            (seconds, micros), pending = await pipe.execute()
        if not pending:
            return None
        read_ms = seconds * 1000 + micros / 1000 - pending[0]["time_since_delivered"]
        return max(read_ms - int(entry_id.split("-", 1)[0]), 0.0) / 1000

    async def cancel(self, request_id: str) -> None:
        await self._publish(self.cfg.cancel, CancelMsg(request_id))

    async def follow(self, request_id: str, last_id: str = "0") -> Subscription:
        """Subscribe to out:{request_id} after last_id; `await sub.get(timeout_s)`, then `sub.close()`."""
        return await self.outs.subscribe(self.cfg.out(request_id), last_id)

    async def history(self, request_id: str) -> list[TokensMsg] | None:
        """Everything out:{request_id} holds; None when the stream does not exist."""
        entries = await self.r.xrange(self.cfg.out(request_id))
        if not entries and not await self.r.exists(self.cfg.out(request_id)):
            return None
        return [msg for _, msg in decode_entries(entries)]

    async def expire(self, request_id: str, ttl_s: int) -> None:
        await self.r.expire(self.cfg.out(request_id), ttl_s)

    async def missing_components(self) -> list[str]:
        """Components (scheduler, stage-k) without a live heartbeat; raises QueueError if Redis is down."""
        names = pipeline_components(self.stages)
        async with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self.cfg.heartbeat(name))
            found = await pipe.execute()
        return [name for name, n in zip(names, found) if not n]

    async def scheduler_stats(self, max_age_s: float) -> SchedulerStatsMsg | None:
        """The scheduler's last snapshot, None if absent, malformed or older than max_age_s."""
        raw = await self.r.get(self.cfg.stats)
        msg = decode_or_log(raw, SchedulerStatsMsg, "gateway") if raw else None
        return msg if msg is not None and time.time() - msg.time <= max_age_s else None

    async def stage_stats(self, max_age_s: float) -> list[StageStatsMsg]:
        """The stages' last snapshots (one round trip), without the absent, malformed and stale ones."""
        raws = await self.r.mget([self.cfg.stage_stats(stage_name(k)) for k in range(self.stages)])
        msgs = [decode_or_log(raw, StageStatsMsg, "gateway") for raw in raws if raw]
        return [m for m in msgs if m is not None and time.time() - m.time <= max_age_s]

    async def occupancy(self, count: int) -> list[OccupancyMsg]:
        """The last `count` final columns of the stage x step grid, oldest first."""
        entries = await self.r.xrevrange(self.cfg.occupancy, count=count)
        msgs = [decode_or_log(fields.get(b"m", b""), OccupancyMsg, "gateway") for _, fields in reversed(entries)]
        return [m for m in msgs if m is not None]

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except RedisError:
            return False
