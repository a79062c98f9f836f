"""The out-stream multiplexer (gateway/outstreams.py) and the bounded pool, against the real Redis.

One reader connection serves every in-flight request; a new subscriber wakes it at
once; a Redis error reaches every waiting request as a QueueError (none hangs) and the
reader recovers; closing deletes the wake stream. Each test uses its own key prefix
and deletes its keys.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from gateway.queue import AsyncQueue, QueueError
from shared.transport.redis_io import RedisConfig
from shared.wire.messages import TokensMsg
from specpipe.cluster import delete_keys
from tests.cluster import REDIS_URL

pytestmark = pytest.mark.unit


@pytest.fixture
def rcfg():
    cfg = RedisConfig(url=REDIS_URL, prefix=f"test-outs-{uuid.uuid4().hex[:8]}")
    yield cfg
    delete_keys(redis.Redis.from_url(REDIS_URL), cfg.prefix)


def _tokens(request_id: str, tokens: list[int], finished: bool = False) -> dict:
    return {"m": TokensMsg(request_id, tokens, finished, "length" if finished else None).encode()}


def _clients(r: redis.Redis, prefix: str) -> list[dict]:
    return [c for c in r.client_list() if c.get("name", "").startswith(prefix)]


async def _collect(sub, until: int, timeout_s: float = 10.0) -> list[int]:
    got: list[int] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < until and time.monotonic() < deadline:
        got += [t for _, msg in await sub.get(0.25) for t in msg.tokens]
    return got


def test_many_requests_share_one_reader_and_a_bounded_pool(rcfg) -> None:
    sync = redis.Redis.from_url(REDIS_URL)

    async def main() -> None:
        q = AsyncQueue(rcfg, stages=1, pool_size=4)
        try:
            subs = [await q.follow(f"r{i}") for i in range(300)]
            for i in range(300):
                sync.xadd(rcfg.out(f"r{i}"), _tokens(f"r{i}", [i, i + 1]))
                sync.xadd(rcfg.out(f"r{i}"), _tokens(f"r{i}", [i + 2], finished=True))
            results = await asyncio.gather(*(_collect(s, 3) for s in subs),
                                           *(q.missing_components() for _ in range(50)))
            assert [r for r in results[:300]] == [[i, i + 1, i + 2] for i in range(300)]
            names = [c["name"] for c in _clients(sync, rcfg.prefix)]
            assert names.count(rcfg.key("gateway", "reader")) == 1
            assert 1 <= names.count(rcfg.key("gateway")) <= 4  # the pool's bound, whatever the load
            for s in subs:
                s.close()
            assert q.outs.size == 0
        finally:
            await q.close()
        assert not sync.exists(q.outs.wake_key)
        assert not _clients(sync, rcfg.prefix)

    asyncio.run(main())


def test_a_new_subscriber_wakes_the_blocked_reader(rcfg) -> None:
    sync = redis.Redis.from_url(REDIS_URL)

    async def main() -> None:
        q = AsyncQueue(rcfg, stages=1)
        q.outs.block_ms = 20_000  # without the wake-up a new stream would wait for this block to end
        try:
            first = await q.follow("a")
            await asyncio.sleep(0.3)  # the reader is blocked in XREAD on "a" alone
            sync.xadd(rcfg.out("b"), _tokens("b", [7]))
            start = time.monotonic()
            second = await q.follow("b")
            assert [t for _, m in await second.get(5.0) for t in m.tokens] == [7]
            assert time.monotonic() - start < 1.0
            assert await first.get(0.05) == []
        finally:
            await q.close()

    asyncio.run(main())


def test_a_redis_error_reaches_every_waiting_request_and_the_reader_recovers(rcfg) -> None:
    sync = redis.Redis.from_url(REDIS_URL)

    async def main() -> None:
        q = AsyncQueue(rcfg, stages=1)
        try:
            subs = [await q.follow(f"r{i}") for i in range(20)]
            await asyncio.sleep(0.3)  # blocked in XREAD
            assert sync.client_kill_filter(_type="normal", skipme=True,
                                           _id=_clients(sync, rcfg.key("gateway", "reader"))[0]["id"]) == 1

            async def outcome(sub) -> str:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        await sub.get(0.25)
                    except QueueError:
                        return "error"
                return "hung"

            assert await asyncio.gather(*(outcome(s) for s in subs)) == ["error"] * 20
            for s in subs:
                s.close()
            sync.xadd(rcfg.out("after"), _tokens("after", [1, 2], finished=True))
            after = await q.follow("after")
            assert await _collect(after, 2) == [1, 2]  # the reader reconnected
        finally:
            await q.close()

    asyncio.run(main())


def test_redis_down_is_a_queue_error_not_a_hang() -> None:
    async def main() -> None:
        q = AsyncQueue(RedisConfig(url="redis://127.0.0.1:1/0", prefix="test-nothing"), stages=1)
        try:
            sub = await q.follow("x")
            start = time.monotonic()
            with pytest.raises(QueueError):
                while time.monotonic() - start < 10:
                    await sub.get(0.25)
            assert time.monotonic() - start < 5
            with pytest.raises(QueueError):
                await q.missing_components()
        finally:
            await q.close()

    asyncio.run(main())
