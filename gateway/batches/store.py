"""Files and batch jobs in Redis (redis.asyncio), under the gateway's key prefix.

Keys (P = the cluster prefix):
    P:files:{file_id}              hash: meta (JSON file object), content (bytes)
    P:files                        zset of file ids by created_at (listing)
    P:batches:{batch_id}           hash: meta (JSON, fixed at creation), status, {status}_at,
                                   output_file_id, error_file_id, errors (JSON)
    P:batches                      zset of batch ids by created_at (listing, resume scan)
    P:batch:{id}:results           hash custom_id -> result line (JSON); written once (HSETNX)
    P:batch:{id}:counts            hash completed / failed / input_tokens / output_tokens, bumped in the
                                   same script as the result
    P:batch:{id}:submitted         set of request ids already published to the requests stream
    P:batch:{id}:lease             the running task's token, with a TTL it refreshes

Every state change that two processes can race on (a result recorded twice, a
request published twice, a status moved by the worker and by a cancel, the
lease) is one Lua script, so it is atomic in Redis.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared.wire.messages import RequestMsg

TERMINAL = ("completed", "failed", "cancelled", "expired")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")

_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[4])
  redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[5])
  return 1
end
return 0
"""
_SUBMIT_ONCE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[2])
  return 1
end
return 0
"""
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
for i = 3, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return {1, ARGV[1]}
  end
end
return {0, cur}
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(frozen=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_json(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None}


class BatchStore:
    """Every Redis operation of files and batches; `r` is a redis.asyncio client, `prefix` the cluster's."""

    def __init__(self, r: aioredis.Redis, prefix: str):
        self.r, self.prefix = r, prefix
        self._record = r.register_script(_RECORD)
        self._submit_once = r.register_script(_SUBMIT_ONCE)
        self._transition = r.register_script(_TRANSITION)
        self._refresh = r.register_script(_REFRESH)
        self._release = r.register_script(_RELEASE)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ---- files ------------------------------------------------------------------------------------
    async def put_file(self, f: StoredFile, content: bytes) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.key("files", f.id), mapping={"meta": json.dumps(f.__dict__), "content": content})
            p.zadd(self.key("files"), {f.id: f.created_at})
            await p.execute()

    async def get_file(self, file_id: str) -> StoredFile | None:
        meta = await self.r.hget(self.key("files", file_id), "meta")
        return StoredFile(**json.loads(meta)) if meta else None

    async def file_content(self, file_id: str) -> bytes | None:
        return await self.r.hget(self.key("files", file_id), "content")

    async def list_files(self, limit: int) -> list[StoredFile]:
        ids = await self.r.zrevrange(self.key("files"), 0, limit - 1)
        found = [await self.get_file(_s(i)) for i in ids]
        return [f for f in found if f is not None]

    async def delete_file(self, file_id: str) -> bool:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.key("files", file_id))
            p.zrem(self.key("files"), file_id)
            deleted, _ = await p.execute()
        return bool(deleted)

    # ---- batches ------------------------------------------------------------------------------------
    async def create_batch(self, meta: dict) -> None:
        """meta: the fixed part of the batch object (id, endpoint, input_file_id, created_at, total, ...)."""
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.key("batches", meta["id"]), mapping={"meta": json.dumps(meta), "status": "validating"})
            p.zadd(self.key("batches"), {meta["id"]: meta["created_at"]})
            await p.execute()

    async def batch_fields(self, batch_id: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(self.key("batches", batch_id))
        return {_s(k): _s(v) for k, v in raw.items()} if raw else None

    async def status(self, batch_id: str) -> str | None:
        return _s(await self.r.hget(self.key("batches", batch_id), "status"))

    async def set_fields(self, batch_id: str, **fields: str) -> None:
        await self.r.hset(self.key("batches", batch_id), mapping=fields)

    async def transition(self, batch_id: str, to: str, *allowed_from: str) -> tuple[bool, str]:
        """Move status to `to` if it is one of allowed_from; (moved, status now)."""
        moved, now = await self._transition(keys=[self.key("batches", batch_id)],
                                            args=[to, int(time.time()), *allowed_from])
        return bool(moved), _s(now) or ""

    async def list_batches(self, limit: int) -> list[str]:
        return [_s(i) for i in await self.r.zrevrange(self.key("batches"), 0, limit - 1)]

    async def counts(self, batch_id: str) -> dict[str, int]:
        raw = await self.r.hgetall(self.key("batch", batch_id, "counts"))
        return {_s(k): int(v) for k, v in raw.items()}

    # ---- per-line progress ---------------------------------------------------------------------------
    async def record_result(self, batch_id: str, custom_id: str, line: dict, ok: bool,
                            tokens: tuple[int, int] = (0, 0)) -> bool:
        """Store one line's result unless one is there already, with its (prompt, completion) tokens added to
        the batch's usage; True if this call stored it."""
        return bool(await self._record(
            keys=[self.key("batch", batch_id, "results"), self.key("batch", batch_id, "counts")],
            args=[custom_id, json.dumps(line, ensure_ascii=False), "completed" if ok else "failed", *tokens]))

    async def results(self, batch_id: str) -> dict[str, dict]:
        raw = await self.r.hgetall(self.key("batch", batch_id, "results"))
        return {_s(k): json.loads(v) for k, v in raw.items()}

    async def done_ids(self, batch_id: str) -> set[str]:
        return {_s(k) for k in await self.r.hkeys(self.key("batch", batch_id, "results"))}

    async def submit_once(self, batch_id: str, requests_stream: str, msg: RequestMsg) -> bool:
        """Publish msg unless its request id was published for this batch before; True if published now."""
        return bool(await self._submit_once(keys=[self.key("batch", batch_id, "submitted"), requests_stream],
                                            args=[msg.request_id, msg.encode(), 100_000]))

    async def was_submitted(self, batch_id: str, request_id: str) -> bool:
        return bool(await self.r.sismember(self.key("batch", batch_id, "submitted"), request_id))

    # ---- the lease: one task runs a batch at a time ----------------------------------------------------
    async def acquire(self, batch_id: str, token: str, ttl_s: float) -> bool:
        return bool(await self.r.set(self.key("batch", batch_id, "lease"), token, nx=True, px=int(ttl_s * 1000)))

    async def refresh(self, batch_id: str, token: str, ttl_s: float) -> bool:
        return bool(await self._refresh(keys=[self.key("batch", batch_id, "lease")], args=[token, int(ttl_s * 1000)]))

    async def release(self, batch_id: str, token: str) -> None:
        await self._release(keys=[self.key("batch", batch_id, "lease")], args=[token])

    async def lease_ttl_ms(self, batch_id: str) -> int:
        """Milliseconds left on the lease; -2 when nobody holds it."""
        return int(await self.r.pttl(self.key("batch", batch_id, "lease")))
