"""The gateway's queue time (gateway/queue.py), against the real Redis with the test's own key prefix.

Queue time is the request's XADD -> the scheduler's read of it (XREADGROUP in the scheduler's group), both on
the Redis clock; once the scheduler acknowledges the request there is nothing left to read it from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest
import redis

from gateway.queue import AsyncQueue
from scheduler.service import SchedulerServiceConfig
from shared.transport.redis_io import SCHEDULER_GROUP, RedisConfig, ensure_group
from shared.wire.messages import RequestMsg
from specpipe.cluster import delete_keys
from tests.cluster import REDIS_URL, ROOT

pytestmark = pytest.mark.unit
WAIT_S = 0.2  # how long the request sits in the stream before the "scheduler" reads it


@pytest.fixture
def rcfg():
    cfg = RedisConfig(url=REDIS_URL, prefix=f"test-queue-{uuid.uuid4().hex[:8]}")
    yield cfg
    delete_keys(redis.Redis.from_url(REDIS_URL), cfg.prefix)


def test_the_group_is_the_schedulers() -> None:
    """Both sides take the group's name from shared/, neither spells it."""
    group = next(f for f in dataclasses.fields(SchedulerServiceConfig) if f.name == "group")
    assert SCHEDULER_GROUP == group.default
    for path in ("gateway/queue.py", "scheduler/service.py"):
        assert '"schedulers"' not in (ROOT / path).read_text()


def test_queue_time_runs_from_the_xadd_to_the_schedulers_read(rcfg) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    ensure_group(r, rcfg.requests, SCHEDULER_GROUP, "0")

    async def go() -> tuple[float | None, float | None, float | None]:
        queue = AsyncQueue(rcfg, stages=1)
        try:
            entry_id = await queue.submit(RequestMsg("cmpl-q", [1, 2], 4))
            unread = await queue.queue_time(entry_id)  # not read yet: not pending
            await asyncio.sleep(WAIT_S)
            r.xreadgroup(SCHEDULER_GROUP, "scheduler-0", {rcfg.requests: ">"}, count=1)
            await asyncio.sleep(WAIT_S)  # a later look gives the same answer: the read's time, not now
            read = await queue.queue_time(entry_id)
            r.xack(rcfg.requests, SCHEDULER_GROUP, entry_id)
            return unread, read, await queue.queue_time(entry_id)
        finally:
            await queue.close()

    start = time.monotonic()
    unread, read, acked = asyncio.run(go())
    assert unread is None and acked is None
    assert read is not None and WAIT_S - 0.01 <= read < min(2 * WAIT_S, time.monotonic() - start)
