"""What the scheduler reports, off the algorithm: step timings, the occupancy grid, the stats snapshot.

- timings: "step:rows:start:wait_start:wait_end:published:verified:end" (time.monotonic(),
  one clock for every process on a host), pushed in batches; benchmarks.wire_overhead
  splits each step into compute, scheduler work, draft wait and wire from these and
  the stages' compute intervals.
- draft timings: "start:seconds:nodes" of each lookup the scheduler drafted itself (LocalDrafts), as a draft
  worker reports its forwards, under the name `draft-scheduler`.
- occupancy: each step's column of the stage x step grid, final once the events of
  its verification are known (the dashboard reads the `occupancy` stream).
- stats: the SchedulerStatsMsg snapshot (metrics and dashboard), rewritten every `interval_s`.
"""

from __future__ import annotations

import time

import redis
from redis.client import Pipeline

from scheduler.occupancy import Occupancy
from scheduler.scheduler import Scheduler
from scheduler.snapshot import stats_message
from shared.transport.redis_io import RedisConfig, publish_all
from shared.types.batch import PipelineEvent, Row
from shared.wire.messages import OccupancyMsg

TIMINGS_BATCH = 64  # step records pushed at once (and whenever the pipe drains)


class Telemetry:
    def __init__(self, r: redis.Redis, cfg: RedisConfig, stages: int, interval_s: float):
        self.r, self.cfg, self.interval_s = r, cfg, interval_s
        self.occupancy = Occupancy(stages)
        self.timings: list[str] = []
        self.draft_timings: list[str] = []
        self.columns: list[OccupancyMsg] = []  # final columns not yet published
        self.sent: tuple[int, list[Row]] | None = None  # the step whose column awaits its events
        self.drained = False  # the pipe drained since the timings were last pushed: push them all
        self.stats_due = 0.0

    def step_sent(self, step: int, rows: list[Row]) -> None:
        self.sent = (step, rows)

    def events_known(self, events: list[PipelineEvent], drained: bool) -> None:
        """The last step's column gets the events every stage applies before the next compute."""
        if self.sent is None:
            return
        columns = self.occupancy.record(*self.sent, events)
        self.sent = None
        if drained:  # the pipe is empty: its last columns are final
            columns += self.occupancy.flush()
        self.columns += [OccupancyMsg(step=c["step"], stages=c["stages"]) for c in columns]

    def step_timed(self, step: int, rows: int, stamps: tuple[float, ...], drained: bool) -> None:
        self.timings.append(":".join([str(step), str(rows), *(f"{t:.6f}" for t in stamps)]))
        self.drained = self.drained or drained

    def draft_timed(self, start: float, seconds: float, nodes: int) -> None:
        self.draft_timings.append(f"{start:.6f}:{seconds:.6f}:{nodes}")

    def flush(self, r: redis.Redis | Pipeline | None = None) -> None:
        """Off the beat (in a step's shadow, on its pipeline, or idle): the columns made final, and the timings
        in batches."""
        r = r or self.r
        columns, self.columns = self.columns, []
        publish_all(r, [(self.cfg.occupancy, c) for c in columns], maxlen=1024)
        if self.timings and (len(self.timings) >= TIMINGS_BATCH or self.drained):
            r.rpush(self.cfg.key("timings", "scheduler"), *self.timings)
            if self.draft_timings:
                r.rpush(self.cfg.key("timings", "draft-scheduler"), *self.draft_timings)
            self.timings, self.draft_timings, self.drained = [], [], False

    def stats(self, scheduler: Scheduler, waiting_since: dict[str, float]) -> None:
        """Rewrite the snapshot when it is due."""
        now = time.monotonic()
        if now < self.stats_due:
            return
        self.stats_due = now + self.interval_s
        msg = stats_message(scheduler, waiting_since, self.occupancy, now, time.time())
        self.r.set(self.cfg.stats, msg.encode(), ex=3600)
