"""A stage's stats snapshot: the StageStatsMsg under `{prefix}:stats:stage-k`, rewritten every `interval_s`
off the beat (from the stage's writer thread), as the scheduler rewrites its own under `{prefix}:stats`
(scheduler/telemetry.py). The gateway reads both at scrape time (/metrics, /dashboard) and leaves out a stale one.
"""

from __future__ import annotations

import time

from shared.compute.kv_cache import KVUse
from shared.transport.redis_io import OffBeatWriter, RedisConfig, stage_name
from shared.wire.messages import StageStatsMsg

SNAPSHOT_TTL_S = 3600  # a stopped stage's snapshot goes eventually; readers ignore it long before (its time)


def stats_message(rank: int, use: KVUse, wall_time: float) -> StageStatsMsg:
    return StageStatsMsg(time=wall_time, stage=rank, requests=use.requests, kv_reserved=use.reserved,
                         kv_filled=use.filled, kv_slots=use.budget, kv_usage=round(use.fraction, 6))


class StageTelemetry:
    def __init__(self, writer: OffBeatWriter, cfg: RedisConfig, rank: int, interval_s: float):
        self.writer, self.key, self.rank, self.interval_s = writer, cfg.stage_stats(stage_name(rank)), rank, interval_s
        self.due = 0.0

    def is_due(self) -> bool:
        """Whether the snapshot should be rewritten now (a time check: the caller measures only then)."""
        return time.monotonic() >= self.due

    def stats(self, use: KVUse) -> None:
        """Rewrite the snapshot; the next is due `interval_s` later."""
        self.due = time.monotonic() + self.interval_s
        key, raw = self.key, stats_message(self.rank, use, time.time()).encode()
        self.writer.submit(lambda r: r.set(key, raw, ex=SNAPSHOT_TTL_S))
