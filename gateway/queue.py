"""The gateway's side of the Redis streams, with redis.asyncio (no blocking call in the event loop).

Async equivalents of shared/redis_io.py's publish/read/alive for the streams the
gateway uses: it writes `requests` and `cancel`, reads `out:{request}`, and checks
the `hb:{component}` heartbeat keys.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.messages import CancelMsg, Message, OccupancyMsg, RequestMsg, SchedulerStatsMsg, TokensMsg
from shared.redis_io import RedisConfig, decode_or_log, pipeline_components

log = logging.getLogger("gateway")

QueueError = RedisError  # what callers catch when Redis is unreachable or answers an error


class AsyncQueue:
    """One connection pool to Redis; every method is a coroutine that only awaits network I/O."""

    def __init__(self, cfg: RedisConfig, stages: int):
        self.cfg, self.stages = cfg, stages
        self.r = aioredis.Redis.from_url(cfg.url, socket_connect_timeout=2, health_check_interval=30)

    async def close(self) -> None:
        await self.r.aclose()

    async def _publish(self, stream: str, msg: Message, maxlen: int = 100_000) -> None:
        await self.r.xadd(stream, {"m": msg.encode()}, maxlen=maxlen, approximate=True)

    async def submit(self, msg: RequestMsg) -> None:
        await self._publish(self.cfg.requests, msg)

    async def cancel(self, request_id: str) -> None:
        await self._publish(self.cfg.cancel, CancelMsg(request_id))

    async def read(self, request_id: str, last_id: str, block_ms: int) -> list[tuple[str, TokensMsg]]:
        """TokensMsgs of out:{request_id} after last_id, waiting up to block_ms for the first one."""
        reply = await self.r.xread({self.cfg.out(request_id): last_id}, count=256, block=max(block_ms, 1))
        return self._decode(entries for _, entries in reply or [])

    async def history(self, request_id: str) -> list[TokensMsg] | None:
        """Everything out:{request_id} holds; None when the stream does not exist."""
        entries = await self.r.xrange(self.cfg.out(request_id))
        if not entries and not await self.r.exists(self.cfg.out(request_id)):
            return None
        return [msg for _, msg in self._decode([entries])]

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

    @staticmethod
    def _decode(groups) -> list[tuple[str, TokensMsg]]:
        out = []
        for entries in groups:
            for entry_id, fields in entries:
                msg = decode_or_log(fields.get(b"m", b""), TokensMsg, "gateway")
                if msg is not None:
                    out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, msg))
        return out
