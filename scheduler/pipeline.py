"""Which pipeline run the scheduler steps, and whether every stage is in it (shared/transport/membership.py).

A run begins when the scheduler starts and again whenever a stage is lost; the
scheduler steps it only once every stage has joined, so requests wait in the
queue meanwhile instead of failing.
"""

from __future__ import annotations

import logging
import time

import redis

from shared.transport.membership import PipelineRun, begin_run, control_addresses, end_run, not_joined
from shared.transport.redis_io import RedisConfig, not_alive, stage_name

log = logging.getLogger("scheduler")
IDLE_CHECK_S = 1.0  # an idle pipeline looks for lost stages this often


class PipelineWatch:
    def __init__(self, r: redis.Redis, cfg: RedisConfig, stages: int, control: str, kv_slots: int = 0):
        """`control`: the scheduler's control inbox, and `kv_slots` its KV budget per stage, which every run
        record names."""
        self.r, self.cfg, self.stages, self.control, self.kv_slots = r, cfg, stages, control, kv_slots
        self.run: PipelineRun | None = None
        self.formed = False  # every stage has joined `run`
        # the stages' control inboxes in this run, read when it formed; the last stage's first: a StepMsg goes out
        # in this order, and the last stage's output is the one the next step waits for
        self.stage_inboxes: list[str] = []
        self.checked = 0.0  # when an idle pipeline was last checked

    def begin(self, base_step: int) -> None:
        self.run = begin_run(self.r, self.cfg, base_step, self.control, self.kv_slots)
        self.formed = False

    def end(self) -> None:
        if self.run is not None:
            end_run(self.r, self.cfg, self.run)

    def ready(self) -> bool:
        """Whether the run can be stepped: every stage alive and in it."""
        if not self.formed:
            self.formed = not not_joined(self.r, self.cfg, self.stages, self.run.epoch)
            if self.formed:
                last_first = [stage_name(k) for k in reversed(range(self.stages))]
                self.stage_inboxes = control_addresses(self.r, self.cfg, last_first)
                log.info("scheduler: run %d formed (steps from %d)", self.run.epoch, self.run.base_step + 1)
        return self.formed

    def lost(self) -> list[int]:
        """Stages whose heartbeat stopped."""
        names = [stage_name(k) for k in range(self.stages)]
        return [names.index(n) for n in not_alive(self.r, self.cfg, names)]

    def lost_while_idle(self) -> list[int]:
        """Checked now and then while no request runs, so a stage lost then is back before one needs it."""
        now = time.monotonic()
        if not self.formed or now - self.checked < IDLE_CHECK_S:
            return []
        self.checked = now
        return self.lost()


def not_running(stages: list[int]) -> str:
    if len(stages) == 1:
        return f"pipeline stage {stages[0]} is not running"
    return f"pipeline stages {', '.join(map(str, stages))} are not running"
