"""`python -m draft_worker`: a speculative source as a process.

Takes expansion jobs from a Redis stream through a consumer group (more
workers scale out), follows the step records' prune/commit/finish events
(applied up to each job's `as_of_step` first, so a job never refers to a tree
the worker has not caught up with), and pushes proposals back.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from shared.transport.redis_io import (
    RedisConfig,
    connect,
    decode_or_log,
    ensure_group,
    publish,
    read,
    start_heartbeat,
    tail_id,
)
from shared.types.batch import PipelineEvent
from shared.types.errors import SpecPipeError
from shared.types.speculation import ExpansionJob, SpeculativeSource
from shared.wire.messages import ExpansionJobMsg, ProposalsMsg, StepMsg

log = logging.getLogger("draft_worker")


@dataclass(frozen=True)
class DraftServiceConfig:
    redis: RedisConfig
    name: str = ""  # consumer name; defaults to host-pid
    group: str = "drafts"
    catch_up_ms: int = 2000  # how long a job may wait for its step record


class DraftService:
    def __init__(self, cfg: DraftServiceConfig, source: SpeculativeSource):
        self.cfg, self.source = cfg, source
        self.name = cfg.name or f"draft-{socket.gethostname()}-{os.getpid()}"
        self.r = connect(cfg.redis)
        self.known: set[str] = set()
        self.steps_last = tail_id(self.r, cfg.redis.steps)  # never replay another run's steps
        self.at = (0, 0)  # (run, step) of the last step record applied: jobs wait for theirs

    def start(self) -> None:
        ensure_group(self.r, self.cfg.redis.draft_jobs, self.cfg.group, "$")

    def run(self) -> None:
        self.start()
        start_heartbeat(self.cfg.redis, self.name)
        log.info("%s ready: %s", self.name, type(self.source).__name__)
        while True:
            self._follow_steps(block_ms=None)
            reply = self.r.xreadgroup(self.cfg.group, self.name, {self.cfg.redis.draft_jobs: ">"}, count=16, block=200)
            entries = [e for _, batch in reply or [] for e in batch] or self._orphaned()
            for entry_id, fields in entries:
                self._handle(fields.get(b"m", b""))
                self.r.xack(self.cfg.redis.draft_jobs, self.cfg.group, entry_id)

    def _orphaned(self) -> list:
        """Jobs a dead worker took and never acknowledged: claim them after a heartbeat's lifetime."""
        idle_ms = int(self.cfg.redis.heartbeat_ttl_s * 1000)
        reply = self.r.xautoclaim(self.cfg.redis.draft_jobs, self.cfg.group, self.name, idle_ms, "0-0", count=16)
        return [e for e in reply[1] if e and e[1]] if reply else []  # trimmed entries come back empty

    def _follow_steps(self, block_ms: int | None, until: tuple[int, int] = (0, 0)) -> None:
        while True:
            entries = read(self.r, self.cfg.redis.steps, self.steps_last, block_ms if self.at < until else None)
            for entry_id, raw in entries:
                self.steps_last = entry_id
                msg = decode_or_log(raw, StepMsg, self.name)
                if msg is not None:
                    self._apply(msg)
            if not entries or self.at >= until:
                return

    def _apply(self, msg: StepMsg) -> None:
        if msg.epoch < self.at[0]:
            log.warning("%s: refused step %d of run %d (following run %d)", self.name, msg.step, msg.epoch, self.at[0])
            return
        if msg.epoch > self.at[0]:  # a new run starts empty: the scheduler failed every request of the last one
            for rid in list(self.known):
                self._reset(rid)
        self.at = (msg.epoch, max(msg.step, self.at[1]) if msg.epoch == self.at[0] else msg.step)
        events = [e for e in msg.events if e.request_id in self.known]
        if events:
            self.source.apply(events)
        self.known -= {e.request_id for e in events if e.kind == "finish"}

    def _handle(self, raw: bytes) -> None:
        job = decode_or_log(raw, ExpansionJobMsg, self.name)
        if job is None:
            return
        self._follow_steps(self.cfg.catch_up_ms, until=(job.epoch, job.as_of_step))
        if job.epoch < self.at[0]:
            return  # a job of a run that has ended: its request is gone
        refs = job.nodes  # [NodeRef]
        try:
            if job.request_id not in self.known:
                self.source.add_request(job.request_id, job.text, job.capacity)
                self.known.add(job.request_id)
            proposals = self.source.expand([ExpansionJob(job.request_id, job.text, refs, job.top_k)])
        except (SpecPipeError, IndexError, KeyError) as exc:
            log.warning("%s: job for %s failed (%s); resetting its draft state", self.name, job.request_id, exc)
            self._reset(job.request_id)
            proposals = [(job.request_id, ref.node_id, []) for ref in refs]
        for rid, node_id, props in proposals:
            msg = ProposalsMsg(rid, node_id, [t for t, _ in props], [float(lp) for _, lp in props])
            publish(self.r, self.cfg.redis.proposals, msg)

    def _reset(self, request_id: str) -> None:
        self.source.apply([PipelineEvent(request_id, "finish")])
        self.known.discard(request_id)
