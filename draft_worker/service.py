"""`python -m draft_worker`: a speculative source as a process.

Takes expansion jobs from a Redis stream through a consumer group (more
workers scale out), follows the scheduler's prune/commit/finish events (the
draft_events stream, applied up to each job's `as_of_step` first, so a job
never refers to a tree the worker has not caught up with), computes an admitted
request's prompt when its job with no nodes comes (while the stages prefill it),
drafts the levels of one read in one forward (every request's nodes in one micro-batch) before its prompts, and
pushes the proposals straight to the scheduler's control inbox (the run record
names it; shared/transport/control.py), off Redis.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from shared.transport.control import Outbox
from shared.transport.membership import current_run
from shared.transport.redis_io import (
    RedisConfig,
    connect,
    decode_or_log,
    ensure_group,
    entries_of,
    read,
    start_heartbeat,
)
from shared.types.batch import PipelineEvent
from shared.types.errors import SpecPipeError
from shared.types.speculation import ExpansionJob, SpeculativeSource, times_a_level
from shared.wire.messages import DraftEventsMsg, ExpansionJobMsg, ProposalsMsg

log = logging.getLogger("draft_worker")
ENDED_KEPT = 4096  # finished requests remembered (a job after its request's finish is late by a step or two)
EVENTS_READ = 256  # draft_events entries per read


@dataclass(frozen=True)
class DraftServiceConfig:
    redis: RedisConfig
    name: str = ""  # consumer name; defaults to host-pid
    group: str = "drafts"
    catch_up_ms: int = 2000  # how long a job may wait for the events it comes after


class DraftService:
    def __init__(self, cfg: DraftServiceConfig, source: SpeculativeSource):
        self.cfg, self.source = cfg, source
        self.name = cfg.name or f"draft-{socket.gethostname()}-{os.getpid()}"
        self.r = connect(cfg.redis)
        self.scheduler = Outbox()  # the current run's scheduler inbox (proposals)
        self.reply_run = -1  # the run whose scheduler `scheduler` points at
        self.known: set[str] = set()
        # requests whose finish was read (the newest ENDED_KEPT): a job that reaches this worker after its request's
        # finish (a prompt sent at admission, then a cancellation) must not register it again, or its KV would stay
        self.ended: dict[str, None] = {}
        # nodes pruned so far, per request: a job asked before a prune went out may reach this worker after it
        # (the scheduler sends a step's events before it waits for the jobs of the step before); such nodes are
        # answered with no proposals (the scheduler drops them anyway), never drafted on a tree without them
        self.pruned: dict[str, set[int]] = {}
        self.events_last = "0"  # the draft_events stream, read after this entry
        self.at = (0, 0)  # (run, step) of the last events record applied: jobs wait for theirs
        # "start:seconds:rows" of each draft forward (time.monotonic()), pushed to timings:{name} in batches:
        # benchmarks.wire_overhead sets the draft's time per level against the step time
        self.timings: list[str] = []

    def start(self) -> None:
        ensure_group(self.r, self.cfg.redis.draft_jobs, self.cfg.group, "$")
        # from the newest events record on (never another run's older ones): it says which run and step the
        # scheduler is at, and events of requests this worker never saw need not be applied
        newest = self.r.xrevrange(self.cfg.redis.draft_events, count=1)
        if newest:
            entry_id, fields = newest[0]
            self.events_last = entry_id.decode()
            self._apply_raw(fields.get(b"m", b""))

    def run(self) -> None:
        self.start()
        start_heartbeat(self.cfg.redis, self.name)
        log.info("%s ready: %s", self.name, type(self.source).__name__)
        done: list[bytes] = []  # the entries of the last read, acknowledged in the next round trip
        while True:
            entries = self._read_jobs(done) or self._orphaned()
            if not entries and self.timings:  # idle: off any critical path
                self.r.rpush(self.cfg.redis.key("timings", self.name), *self.timings)
                self.timings = []
            if entries:
                self._handle([fields.get(b"m", b"") for _, fields in entries])
            done = [entry_id for entry_id, _ in entries]

    def _read_jobs(self, done: list[bytes]) -> list:
        """One round trip: the last read's jobs acknowledged, new ones read (waiting up to 200 ms for one), then
        the events published before them, applied (the scheduler publishes a job's events ahead of it, so a job
        read here never waits for a second read of its events)."""
        cfg = self.cfg.redis
        with self.r.pipeline(transaction=False) as pipe:
            if done:
                pipe.xack(cfg.draft_jobs, self.cfg.group, *done)
            pipe.xreadgroup(self.cfg.group, self.name, {cfg.draft_jobs: ">"}, count=64, block=200)
            pipe.xread({cfg.draft_events: self.events_last}, count=EVENTS_READ)
            jobs, events = pipe.execute()[-2:]
        events = entries_of(events)
        self._take_events(events)
        if len(events) == EVENTS_READ:  # more than one read holds
            self._follow_events(block_ms=None)
        return [e for _, batch in jobs or [] for e in batch]

    def _orphaned(self) -> list:
        """Jobs a dead worker took and never acknowledged: claim them after a heartbeat's lifetime."""
        idle_ms = int(self.cfg.redis.heartbeat_ttl_s * 1000)
        reply = self.r.xautoclaim(self.cfg.redis.draft_jobs, self.cfg.group, self.name, idle_ms, "0-0", count=16)
        return [e for e in reply[1] if e and e[1]] if reply else []  # trimmed entries come back empty

    def _follow_events(self, block_ms: int | None, until: tuple[int, int] = (0, 0)) -> None:
        while True:
            entries = read(self.r, self.cfg.redis.draft_events, self.events_last, block_ms if self.at < until else None,
                           count=EVENTS_READ)
            self._take_events(entries)
            if not entries or self.at >= until:
                return

    def _take_events(self, entries: list[tuple[str, bytes]]) -> None:
        """Apply draft_events entries read after `events_last`, in order, and read on after them."""
        for entry_id, raw in entries:
            self.events_last = entry_id
            self._apply_raw(raw)

    def _apply_raw(self, raw: bytes) -> None:
        msg = decode_or_log(raw, DraftEventsMsg, self.name)
        if msg is not None:
            self._apply(msg)

    def _apply(self, msg: DraftEventsMsg) -> None:
        if msg.epoch < self.at[0]:
            log.warning("%s: refused step %d of run %d (following run %d)", self.name, msg.step, msg.epoch, self.at[0])
            return
        if msg.epoch > self.at[0]:  # a new run starts empty: the scheduler failed every request of the last one
            for rid in list(self.known):
                self._reset(rid)
        self.at = (msg.epoch, max(msg.step, self.at[1]) if msg.epoch == self.at[0] else msg.step)
        for e in msg.events:
            if e.kind == "finish":
                self.ended[e.request_id] = None
        while len(self.ended) > ENDED_KEPT:
            del self.ended[next(iter(self.ended))]
        events = [e for e in msg.events if e.request_id in self.known]
        if events:
            self.source.apply(events)
        for e in events:
            if e.kind == "prune":
                self.pruned.setdefault(e.request_id, set()).update(e.node_ids)
            elif e.kind == "finish":
                self.known.discard(e.request_id)
                self.pruned.pop(e.request_id, None)

    def _handle(self, raws: list[bytes]) -> None:
        """The jobs of one read: its levels drafted in one forward (every request's frontier nodes in one
        micro-batch; the source attends each node within its own request's tree) and answered, then its prompts
        (a waited level never queues behind a prompt read with it). A job that fails is retried alone, so one
        request's broken draft state resets only that request."""
        jobs = [job for raw in raws if (job := decode_or_log(raw, ExpansionJobMsg, self.name)) is not None]
        if not jobs:
            return
        until = max((job.epoch, job.as_of_step) for job in jobs)
        if self.at < until:  # read with the jobs, the events they come after are usually in already
            self._follow_events(self.cfg.catch_up_ms, until)
        proposals, batch, prompts = [], [], []
        for job in jobs:
            if job.epoch < self.at[0]:
                continue  # a job of a run that has ended: its request is gone
            if not job.nodes:  # a request just admitted: its prompt, while the stages prefill it
                prompts.append(job)
                continue
            pruned = self.pruned.get(job.request_id, set())
            proposals += [(job.request_id, ref.node_id, []) for ref in job.nodes if ref.node_id in pruned]
            refs = [ref for ref in job.nodes if ref.node_id not in pruned]  # [NodeRef]
            if refs and self._known(job):
                batch.append(ExpansionJob(job.request_id, job.text, refs, job.top_k))
        start, forward = time.monotonic(), (0, 0.0)
        try:
            drafted = self.source.expand(batch) if batch else []
            nodes, seconds = sum(len(job.nodes) for job in batch), time.monotonic() - start
            self.timings += [f"{start:.6f}:{seconds:.6f}:{nodes}"] if nodes else []
            if times_a_level(nodes, self.source.computed_rows):
                forward = (nodes, seconds)
            proposals += drafted
        except (SpecPipeError, IndexError, KeyError):
            for job in batch:
                proposals += self._expand_alone(job)
        self._reply(proposals, forward)
        for job in prompts:
            self._prefill(job)

    def _reply(self, proposals: list, forward: tuple[int, float] = (0, 0.0)) -> None:
        """Every answer to the scheduler of the run followed (its inbox looked up once per run), in one write;
        the first one carries the forward's (frontier nodes, seconds)."""
        if self.reply_run != self.at[0]:
            run = current_run(self.r, self.cfg.redis)
            self.scheduler.connect([run.control] if run is not None and run.control else [])
            self.reply_run = self.at[0]
        messages = []
        for i, (rid, node_id, props) in enumerate(proposals):
            nodes, seconds = forward if i == 0 else (0, 0.0)
            messages.append(ProposalsMsg(rid, node_id, [t for t, _ in props], [float(lp) for _, lp in props],
                                         nodes, seconds))
        self.scheduler.send_all(messages)

    def _known(self, job: ExpansionJobMsg) -> bool:
        """Register the job's request with the source on its first job; False (and reset) when that fails."""
        if job.request_id in self.known:
            return True
        if job.request_id in self.ended:
            return False
        try:
            self.source.add_request(job.request_id, job.text, job.capacity)
        except SpecPipeError as exc:
            log.warning("%s: cannot draft for %s (%s)", self.name, job.request_id, exc)
            return False
        self.known.add(job.request_id)
        return True

    def _prefill(self, job: ExpansionJobMsg) -> None:
        if job.request_id in self.known or not self._known(job):  # drafted for already: it has caught up itself
            return
        try:
            self.source.prefill(job.request_id, job.text)
        except (SpecPipeError, IndexError, KeyError) as exc:
            log.warning("%s: prompt of %s failed (%s); resetting its draft state", self.name, job.request_id, exc)
            self._reset(job.request_id)

    def _expand_alone(self, job: ExpansionJob) -> list:
        try:
            return self.source.expand([job])
        except (SpecPipeError, IndexError, KeyError) as exc:
            log.warning("%s: job for %s failed (%s); resetting its draft state", self.name, job.request_id, exc)
            self._reset(job.request_id)
            return [(job.request_id, ref.node_id, []) for ref in job.nodes]

    def _reset(self, request_id: str) -> None:
        self.source.apply([PipelineEvent(request_id, "finish")])
        self.known.discard(request_id)
        self.pruned.pop(request_id, None)
