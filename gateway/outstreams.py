"""One reader for the out streams of every in-flight request: the gateway's Redis use does not grow with load.

Each request that follows its `out:{request}` stream subscribes here and waits on
its own Subscription (an in-process buffer and event: no Redis call per request).
One reader task does a single XREAD BLOCK over all subscribed streams plus this
instance's wake stream, and hands each stream's new entries to its subscriber.
A new subscription wakes the reader at once (an XADD to the wake stream), so it
never waits for the current block to expire. The reader has its own connection;
everything else the gateway does goes through AsyncQueue's bounded pool.

On a Redis error the reader gives every current subscriber that error (the
request ends with the engine's clean "lost the connection" error) and retries
with a growing pause; it never stops while subscriptions exist, and a
subscriber restarts it if it ever died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.transport.redis_io import RedisConfig, decode_or_log
from shared.wire.messages import TokensMsg

log = logging.getLogger("gateway")

BLOCK_MS = 1000  # longest XREAD block; a new subscriber wakes the reader earlier
COUNT = 256  # entries per stream per read
RETRY_S, RETRY_MAX_S = 0.05, 1.0  # the reader's pause after a Redis error (doubled up to the max)
WAKE_TTL_S = 3600  # the wake stream outlives a crashed gateway by this much at most

Entry = tuple[str, TokensMsg]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_entries(entries) -> list[Entry]:
    """(entry id, TokensMsg) of raw stream entries; malformed ones are logged and skipped."""
    out = []
    for entry_id, fields in entries:
        msg = decode_or_log(fields.get(b"m", b""), TokensMsg, "gateway")
        if msg is not None:
            out.append((_text(entry_id), msg))
    return out


class Subscription:
    """One request's view of its out stream: `await get(timeout_s)` gives the entries that arrived."""

    def __init__(self, hub: OutStreams, key: str, last_id: str = "0"):
        self.hub, self.key, self.last_id = hub, key, last_id
        self._entries: list[Entry] = []
        self._error: RedisError | None = None
        self._ready = asyncio.Event()

    def put(self, entries: list[Entry]) -> None:
        self._entries.extend(entries)
        self._ready.set()

    def fail(self, error: RedisError) -> None:
        self._error = error
        self._ready.set()

    async def get(self, timeout_s: float) -> list[Entry]:
        """Every entry received since the last call, waiting up to timeout_s for one ([] if none came).
        Raises the reader's RedisError (once) when it lost Redis."""
        self.hub.ensure_reader()
        if not self._entries and self._error is None:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout_s, 0.0)):
                    await self._ready.wait()
        if self._entries:
            entries, self._entries = self._entries, []
            return entries
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return []

    def close(self) -> None:
        self.hub.unsubscribe(self)


class OutStreams:
    """The reader task and its subscriptions; `notify` (the bounded pool) sends the wake-ups."""

    def __init__(self, cfg: RedisConfig, notify: aioredis.Redis, block_ms: int = BLOCK_MS):
        self.cfg, self.notify, self.block_ms = cfg, notify, block_ms
        self.wake_key = cfg.key("gateway", "wake", uuid.uuid4().hex)
        pool = aioredis.ConnectionPool.from_url(cfg.url, max_connections=1, socket_connect_timeout=2,
                                                socket_timeout=block_ms / 1000 + 10,
                                                client_name=cfg.key("gateway", "reader"))
        self.reader = aioredis.Redis.from_pool(pool)
        self._subs: dict[str, Subscription] = {}
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._blocked = self._wake_sent = self._closed = False
        self._wake_id = "0"

    @property
    def size(self) -> int:
        return len(self._subs)

    async def subscribe(self, key: str, last_id: str = "0") -> Subscription:
        """Follow stream `key` after `last_id`; the reader includes it in its next read at once."""
        sub = Subscription(self, key, last_id)
        self._subs[key] = sub
        self.ensure_reader()
        await self._wake()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]

    def ensure_reader(self) -> None:
        if self._closed or (self._task is not None and not self._task.done()):
            return
        if self._task is not None and not self._task.cancelled() and self._task.exception() is not None:
            log.error("out-stream reader had stopped (%r); restarting it", self._task.exception())
        self._task = asyncio.create_task(self._run(), name="gateway-out-streams")

    async def close(self) -> None:
        """Stop the reader, fail what still waits, delete the wake stream."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for sub in list(self._subs.values()):
            sub.fail(RedisError("the gateway is shutting down"))
        with contextlib.suppress(RedisError, OSError):
            await self.notify.delete(self.wake_key)
        await self.reader.aclose()

    async def _wake(self) -> None:
        """Make the reader start a new read that includes every subscription."""
        if not self._blocked:  # idle, or between reads: its next read includes the new stream anyway
            self._idle.set()
            return
        if self._wake_sent:
            return
        self._wake_sent = True
        try:
            async with self.notify.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": b"1"}, maxlen=8, approximate=False)
                pipe.expire(self.wake_key, WAKE_TTL_S)
                await pipe.execute()
        except RedisError as exc:  # the read still ends within block_ms; the reader meets the error itself
            log.debug("out-stream wake-up failed: %s", exc)

    async def _run(self) -> None:
        pause = RETRY_S
        while not self._closed:
            if not self._subs:
                self._idle.clear()
                await self._idle.wait()
                continue
            try:
                reply = await self._read()
            except RedisError as exc:
                self._fail_all(exc, pause)
            except Exception as exc:  # a bug, not Redis: still no request may hang on it
                log.exception("out-stream reader failed")
                self._fail_all(RedisError(f"the out-stream reader failed: {type(exc).__name__}"), pause)
            else:
                self._dispatch(reply)
                pause = RETRY_S
                continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)

    async def _read(self):
        streams = {self.wake_key: self._wake_id, **{key: sub.last_id for key, sub in self._subs.items()}}
        self._wake_sent, self._blocked = False, True
        try:
            return await self.reader.xread(streams, count=COUNT, block=self.block_ms)
        finally:
            self._blocked = False

    def _dispatch(self, reply) -> None:
        for name, entries in (reply.items() if isinstance(reply, dict) else reply or []):
            if not entries:
                continue
            key, last_id = _text(name), _text(entries[-1][0])
            if key == self.wake_key:
                self._wake_id = last_id
                continue
            sub = self._subs.get(key)
            if sub is not None:
                sub.last_id = last_id
                sub.put(decode_entries(entries))

    def _fail_all(self, error: RedisError, pause: float) -> None:
        log.warning("out-stream reader: redis error: %s (%d waiting requests get it; retrying in %.2f s)",
                    error, len(self._subs), pause)
        for sub in list(self._subs.values()):
            sub.fail(error)
