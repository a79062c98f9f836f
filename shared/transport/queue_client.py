"""Submit requests to the cluster and read their token streams (blocking client)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from shared.transport.redis_io import RedisConfig, decode_or_log, publish, read
from shared.wire.messages import RequestMsg, TokensMsg


@dataclass
class Completion:
    request_id: str
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


def submit(r: redis.Redis, cfg: RedisConfig, msg: RequestMsg) -> None:
    publish(r, cfg.requests, msg)


def collect(r: redis.Redis, cfg: RedisConfig, request_id: str, timeout_s: float = 120.0) -> Completion:
    """Read out:{request_id} until the request finishes (or the timeout passes)."""
    done, last, deadline = Completion(request_id), "0", time.monotonic() + timeout_s
    while not done.finished and time.monotonic() < deadline:
        for entry_id, raw in read(r, cfg.out(request_id), last, block_ms=500):
            last = entry_id
            msg = decode_or_log(raw, TokensMsg, "client")
            if msg is None:
                continue
            done.tokens.extend(msg.tokens)
            if msg.finished:
                done.finished, done.finish_reason, done.error = True, msg.finish_reason, msg.error
    return done
