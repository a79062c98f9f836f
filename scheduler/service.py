"""`python -m scheduler`: the Scheduler state machine behind Redis streams.

Loop, one pipeline step per iteration:
  1. read new requests (consumer group: a request is acknowledged only when it
     finished or failed), admit those whose KV fits, refuse past the queue limit,
  2. take the draft's proposals: those of the jobs published during the last
     step are waited for, at most `draft_wait_s` (a lost or slow draft only
     lowers speculation); publish jobs for nodes that need this step's events,
  3. schedule() and publish the StepMsg (events of the last verification,
     admitted requests, stage 0's rows), then at once the jobs that expand the
     level it sends, so the draft works while the stages compute,
  4. wait for the last stage's VerifyMsg of this step, verify, publish tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass

from scheduler.occupancy import Occupancy
from scheduler.scheduler import Request, Scheduler
from scheduler.snapshot import stats_message
from shared.batch import PipelineEvent, Row, StageOutput
from shared.config import SamplingParams
from shared.errors import ConfigError, SpecPipeError
from shared.membership import PipelineRun, begin_run, end_run, not_joined, trim_old_runs
from shared.messages import (
    CancelMsg,
    ExpansionJobMsg,
    OccupancyMsg,
    ProposalsMsg,
    RequestMsg,
    StageErrorMsg,
    StepMsg,
    TokensMsg,
    VerifyMsg,
)
from shared.redis_io import (
    RedisConfig,
    alive,
    any_alive,
    connect,
    decode_or_log,
    ensure_group,
    publish,
    read,
    stage_name,
    start_heartbeat,
    tail_id,
)
from stage_worker.link import pack_flags

log = logging.getLogger("scheduler")


@dataclass(frozen=True)
class SchedulerServiceConfig:
    redis: RedisConfig
    stages: int
    max_queue: int = 256  # waiting requests beyond this are refused ("queue full" -> HTTP 429)
    kv_slots: int = 1 << 16  # KV slots per stage shared by admitted requests (admission control)
    verify_timeout_s: float = 120.0
    # Before scheduling a step, wait up to this long for the proposals of the jobs published during the previous
    # step (the draft expands level t while the stages compute step t, so a draft about as fast as a step is
    # ready in time). 0 never waits: a draft slower than a step then never gets a level into the pipe.
    draft_wait_s: float = 1.0
    # A request the scheduler before this one took and never finished is queued again when it is younger than
    # this and none of its output went out; otherwise it is failed cleanly (its client is gone or has part of it).
    recover_within_s: float = 600.0
    stats_interval_s: float = 0.5  # how often the stats snapshot (metrics, dashboard) is rewritten
    group: str = "schedulers"
    consumer: str = "scheduler-0"

    def __post_init__(self) -> None:
        if self.draft_wait_s < 0:
            raise ConfigError("the draft wait must be >= 0 (0: never wait)")


class SchedulerService:
    def __init__(self, cfg: SchedulerServiceConfig, scheduler: Scheduler, stop_ids: frozenset[int]):
        self.cfg, self.scheduler, self.stop_ids = cfg, scheduler, stop_ids
        self.r = connect(cfg.redis)
        self.waiting: deque[tuple[str, Request]] = deque()
        self.arrived: dict[str, float] = {}  # waiting request id -> monotonic arrival (queue time)
        self.entry_of: dict[str, str] = {}  # request id -> requests-stream entry to acknowledge
        self.slots_used: dict[str, int] = {}
        self.next_slot = 0
        self.pending_events: list[list] = []
        self.verify_last, self.proposals_last = "$", "$"
        self.admitted: list[dict] = []  # admitted since the last StepMsg; stages register them first
        # "step:rows:start:wait_start:wait_end:published:verified:end" (time.monotonic(), one clock for every
        # process on a host), flushed in batches: benchmarks.wire_overhead splits each step into compute,
        # scheduler work, draft wait and wire from these and the stages' compute intervals
        self.timings: list[str] = []
        self.drafts_alive = True
        self.awaiting: set[tuple[str, int]] = set()  # (request, node) of the jobs published since the last wait
        self.errors_last = "$"
        self.link_lost = False  # a stage reported a lost peer in this run
        self.stage_failures: list[StageErrorMsg] = []  # request-level failures read, not yet applied
        self.cancel_last = "$"
        self.occupancy = Occupancy(cfg.stages)
        self.last_sent: tuple[int, list[Row]] | None = None  # the step whose column awaits its events
        self.stats_due = 0.0
        self.run_: PipelineRun | None = None  # shared/membership.py: the run this scheduler steps
        self.formed = False  # every stage has joined run_
        self.pipeline_checked = 0.0  # when an idle scheduler last looked for lost stages

    # ---- setup --------------------------------------------------------------------------------
    def start(self) -> None:
        """A new run: older runs' per-step messages go, requests the last scheduler held are recovered."""
        ensure_group(self.r, self.cfg.redis.requests, self.cfg.group, "0")
        trimmed = trim_old_runs(self.r, self.cfg.redis)
        self._begin_run()
        self.verify_last = tail_id(self.r, self.cfg.redis.verify)
        self.proposals_last = tail_id(self.r, self.cfg.redis.proposals)
        self.errors_last = tail_id(self.r, self.cfg.redis.errors)
        self.cancel_last = tail_id(self.r, self.cfg.redis.cancel)
        log.info("scheduler: run %d began (%d messages of earlier runs trimmed)", self.run_.epoch, trimmed)
        self._recover()

    def run(self, stop_after_idle_s: float | None = None) -> None:
        self.start()
        start_heartbeat(self.cfg.redis, "scheduler")
        p = self.scheduler.policy
        log.info("scheduler ready: %s, %d stages, width %d, draft wait %.0f ms", p.name, p.stages, p.width,
                 1000 * self.cfg.draft_wait_s)
        idle_since = time.monotonic()
        try:
            while True:
                busy = bool(self.scheduler.active()) and self.formed
                self._ingest(block_ms=None if busy else 200)
                self._cancellations()
                self._admit()
                self._publish_stats()
                if not self.scheduler.active():
                    self._record_occupancy()  # the pipe drained: its last columns are final
                    self._watch_idle_pipeline()
                    if stop_after_idle_s and time.monotonic() - idle_since > stop_after_idle_s:
                        return
                    continue
                idle_since = time.monotonic()
                if self._pipeline_formed():
                    self.step()
        finally:
            end_run(self.r, self.cfg.redis, self.run_)

    # ---- pipeline runs (shared/membership.py) ---------------------------------------------------
    def _begin_run(self) -> None:
        self.run_ = begin_run(self.r, self.cfg.redis, base_step=self.scheduler.step)
        self.formed = False
        self.pending_events, self.last_sent = [], None
        self.awaiting.clear()
        self.link_lost, self.stage_failures = False, []

    def _pipeline_formed(self) -> bool:
        """Steps go out only once every stage has joined this run (requests wait in the queue meanwhile)."""
        if not self.formed:
            missing = not_joined(self.r, self.cfg.redis, self.cfg.stages, self.run_.epoch)
            self.formed = not missing
            if self.formed:
                log.info("scheduler: run %d formed (steps from %d)", self.run_.epoch, self.run_.base_step + 1)
        return self.formed

    def _watch_idle_pipeline(self) -> None:
        """An idle pipeline that lost a stage re-forms before the next request needs it."""
        now = time.monotonic()
        if self.formed and now - self.pipeline_checked > 1.0:
            self.pipeline_checked = now
            if lost := self._lost_stages():
                self._reform(_not_running(lost))

    def _lost_stages(self) -> list[int]:
        return [k for k in range(self.cfg.stages) if not alive(self.r, self.cfg.redis, stage_name(k))]

    def _reform(self, reason: str) -> None:
        """A stage was lost: its in-flight requests fail with `reason`, and a new run re-forms the pipeline."""
        log.error("scheduler: %s; failing %d in-flight requests, re-forming the pipeline", reason,
                  len(self.scheduler.active()))
        self._fail_all(f"{reason}; request failed")
        self._begin_run()
        log.info("scheduler: run %d began; waiting for every stage to join it", self.run_.epoch)

    def _recover(self) -> None:
        """Requests the scheduler before this one (same consumer) took and never finished."""
        last = "0"
        while True:
            reply = self.r.xreadgroup(self.cfg.group, self.cfg.consumer, {self.cfg.redis.requests: last}, count=64)
            entries = [e for _, batch in reply or [] for e in batch]
            if not entries:
                return
            for entry_id, fields in entries:
                last = entry_id.decode()
                self._recover_one(last, (fields or {}).get(b"m", b""))

    def _recover_one(self, entry_id: str, raw: bytes) -> None:
        msg = decode_or_log(raw, RequestMsg, "scheduler") if raw else None
        if msg is None:  # trimmed or malformed
            self.r.xack(self.cfg.redis.requests, self.cfg.group, entry_id)
        elif self.r.exists(self.cfg.redis.out(msg.request_id)):
            self._fail(msg.request_id, "the scheduler restarted while this request ran; retry it", entry_id)
        elif time.time() - msg.arrival > self.cfg.recover_within_s:
            self._fail(msg.request_id, "the scheduler restarted before this request ran; retry it", entry_id)
        else:
            log.info("scheduler: request %s queued again after a restart", msg.request_id)
            self._receive(entry_id, raw)

    # ---- requests -------------------------------------------------------------------------------
    def _ingest(self, block_ms: int | None) -> None:
        reply = self.r.xreadgroup(self.cfg.group, self.cfg.consumer, {self.cfg.redis.requests: ">"}, count=64, block=block_ms)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._receive(entry_id.decode(), fields.get(b"m", b""))

    def _receive(self, entry_id: str, raw: bytes) -> None:
        msg = decode_or_log(raw, RequestMsg, "scheduler")
        if msg is None:
            self.r.xack(self.cfg.redis.requests, self.cfg.group, entry_id)
            return
        try:
            sampling = SamplingParams(msg.temperature, msg.top_p, msg.top_k, msg.seed)
            stop = frozenset(msg.stop_ids) | self.stop_ids
            policy = None
            if msg.policy is not None or msg.width is not None:
                base = self.scheduler.policy
                policy = dataclasses.replace(base, name=msg.policy or base.name, width=msg.width or base.width)
            request = Request(msg.request_id, tuple(msg.prompt_ids), sampling, msg.max_new_tokens, stop, policy)
            self.scheduler.check(request)
            if msg.request_id in self.scheduler.requests or msg.request_id in self.entry_of:
                raise SpecPipeError(f"duplicate request id '{msg.request_id}'")
        except SpecPipeError as exc:
            self._fail(msg.request_id, str(exc), entry_id)
            return
        if len(self.waiting) >= self.cfg.max_queue:
            self._fail(msg.request_id, "queue full", entry_id, reason="queue_full")
            return
        self.entry_of[msg.request_id] = entry_id
        self.waiting.append((msg.request_id, request))
        self.arrived[msg.request_id] = time.monotonic()

    def _admit(self) -> None:
        while self.waiting:
            rid, request = self.waiting[0]
            need = self.scheduler.kv_capacity(request)
            if sum(self.slots_used.values()) + need > self.cfg.kv_slots:
                break  # waits in the queue until running requests free their KV
            self.waiting.popleft()
            self.arrived.pop(rid, None)
            self.scheduler.add_request(request)
            self.slots_used[rid] = need
            s = request.sampling
            self.admitted.append({
                "request_id": rid, "slot": self.next_slot, "prompt_len": len(request.prompt), "capacity": need,
                "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed,
            })
            self.next_slot += 1

    def _fail(self, rid: str, error: str, entry_id: str | None = None, reason: str = "error") -> None:
        publish(self.r, self.cfg.redis.out(rid), TokensMsg(rid, [], True, reason, error), maxlen=10_000)
        if entry_id:
            self.r.xack(self.cfg.redis.requests, self.cfg.group, entry_id)

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> None:
        start = time.monotonic()
        wait_span = self._draft_io()
        self._record_occupancy()
        batch = self.scheduler.schedule()
        rows = batch.rows
        self.last_sent = (self.scheduler.step, rows)
        msg = StepMsg(
            step=self.scheduler.step, batch_id=batch.batch_id, events=self.pending_events,
            admitted=self.admitted, epoch=self.run_.epoch,
            request_ids=[r.request_id for r in rows], node_ids=[r.node_id for r in rows],
            parent_ids=[r.parent_id for r in rows], positions=[r.position for r in rows],
            tokens=[r.token for r in rows], flags=[pack_flags(r) for r in rows],
        )
        self.admitted, self.pending_events = [], []
        published = time.monotonic()
        publish(self.r, self.cfg.redis.steps, msg)
        self._publish_jobs(as_of_step=msg.step)  # the level just sent: drafted while the stages compute it
        verify = self._await_verify(msg.step)
        if verify is None:
            return
        verified = time.monotonic()
        output = self._stage_output(verify)
        result = self.scheduler.update_from_output(output)
        self._stage_errors(result)  # after the verification: a request failed by a stage is not verified again
        self.pending_events = [[e.request_id, e.kind, list(e.node_ids)] for e in result.events]
        self._publish_tokens(result.new_tokens, result.finished)
        stamps = (start, *wait_span, published, verified, time.monotonic())
        self.timings.append(":".join([str(msg.step), str(len(rows)), *(f"{t:.6f}" for t in stamps)]))
        if len(self.timings) >= 64 or not self.scheduler.active():
            self.r.rpush(self.cfg.redis.key("timings", "scheduler"), *self.timings)
            self.timings = []

    def _stage_output(self, v: VerifyMsg) -> StageOutput:
        rows = [Row(rid, node, 0, 0, 0, False, True) for rid, node in zip(v.request_ids, v.node_ids)]
        return StageOutput(v.batch_id, rows, list(v.targets))

    # ---- observability ----------------------------------------------------------------------------
    def _record_occupancy(self) -> None:
        """The last step's column gets the events every stage applies before the next compute."""
        if self.last_sent is not None:
            events = [PipelineEvent(rid, kind, tuple(nodes)) for rid, kind, nodes in self.pending_events]
            columns = self.occupancy.record(*self.last_sent, events)
            self.last_sent = None
            if not self.scheduler.active():
                columns += self.occupancy.flush()
            for c in columns:
                publish(self.r, self.cfg.redis.occupancy, OccupancyMsg(c["step"], c["stages"]), maxlen=1024)

    def _publish_stats(self) -> None:
        now = time.monotonic()
        if now < self.stats_due:
            return
        self.stats_due = now + self.cfg.stats_interval_s
        waiting = {rid: self.arrived.get(rid, now) for rid, _ in self.waiting}
        msg = stats_message(self.scheduler, waiting, self.occupancy, now, time.time())
        self.r.set(self.cfg.redis.stats, msg.encode(), ex=3600)

    def _await_verify(self, step: int) -> VerifyMsg | None:
        """The last stage's output of `step`; None when the pipeline broke (in-flight requests failed, new run).

        A stage that lost its link reports it at once; the broken pipeline is then blamed on a stage whose
        heartbeat stops within one heartbeat lifetime, else on the link itself."""
        now = time.monotonic()
        deadline, link_lost_at = now + self.cfg.verify_timeout_s, None
        while (now := time.monotonic()) < deadline:
            for entry_id, raw in read(self.r, self.cfg.redis.verify, self.verify_last, block_ms=250):
                self.verify_last = entry_id
                msg = decode_or_log(raw, VerifyMsg, "scheduler")
                if msg is not None and msg.step == step and msg.epoch == self.run_.epoch:
                    return msg
            if lost := self._lost_stages():
                self._reform(_not_running(lost))
                return None
            self._read_stage_errors()
            if link_lost_at is None and self.link_lost:
                link_lost_at = now
            if link_lost_at is not None and now - link_lost_at > self.cfg.redis.heartbeat_ttl_s:
                self._reform("the link between pipeline stages failed")
                return None
        self._reform(f"no output from the last stage within {self.cfg.verify_timeout_s:.0f} s")
        return None

    def _read_stage_errors(self) -> None:
        """The errors stream: request failures wait for _stage_errors; a lost link is noted at once."""
        for entry_id, raw in read(self.r, self.cfg.redis.errors, self.errors_last, block_ms=None):
            self.errors_last = entry_id
            msg = decode_or_log(raw, StageErrorMsg, "scheduler")
            if msg is not None and msg.link_lost:
                self.link_lost = True
            elif msg is not None:
                self.stage_failures.append(msg)

    def _cancellations(self) -> None:
        """Cancelled requests leave at once: waiting ones are dropped, running ones free their KV and tree."""
        from scheduler.scheduler import StepResult

        result = StepResult()
        for entry_id, raw in read(self.r, self.cfg.redis.cancel, self.cancel_last, block_ms=None):
            self.cancel_last = entry_id
            msg = decode_or_log(raw, CancelMsg, "scheduler")
            rid = msg.request_id if msg is not None else None
            if rid is None:
                continue
            waiting = [w for w in self.waiting if w[0] == rid]
            state = self.scheduler.requests.get(rid)
            if waiting:
                self.waiting.remove(waiting[0])
                self.arrived.pop(rid, None)
            elif state is not None and state.finish_reason is None:
                self.scheduler.finish(state, "cancelled", result)
                del self.scheduler.requests[rid]
                self.slots_used.pop(rid, None)
            else:
                continue
            publish(self.r, self.cfg.redis.out(rid), TokensMsg(rid, [], True, "cancelled"), maxlen=10_000)
            entry = self.entry_of.pop(rid, None)
            if entry:
                self.r.xack(self.cfg.redis.requests, self.cfg.group, entry)
        self.pending_events += [[e.request_id, e.kind, list(e.node_ids)] for e in result.events]

    def _stage_errors(self, result) -> None:
        """Fail the requests a stage could not compute (KV full, protocol error, ...)."""
        self._read_stage_errors()
        for msg in self.stage_failures:
            for rid in msg.request_ids:
                state = self.scheduler.requests.get(rid)
                if state is not None and state.finish_reason is None:
                    self.scheduler.finish(state, "error", result)
                    self._fail(rid, f"stage {msg.stage}: {msg.error}", self.entry_of.pop(rid, None))
                    self.slots_used.pop(rid, None)
                    del self.scheduler.requests[rid]
        self.stage_failures = []

    def _fail_all(self, error: str) -> None:
        from scheduler.scheduler import StepResult

        result = StepResult()  # its events are not sent: every process starts the next run empty
        not_sent = {a["request_id"] for a in self.admitted}  # admitted, never in the pipe: kept for the next run
        for state in self.scheduler.active():
            rid = state.request.request_id
            if rid in not_sent:
                continue
            self.scheduler.finish(state, "error", result)
            self._fail(rid, error, self.entry_of.pop(rid, None))
            self.slots_used.pop(rid, None)
            del self.scheduler.requests[rid]

    def _publish_tokens(self, new_tokens: dict[str, list[int]], finished: list[str]) -> None:
        done = set(finished)
        for rid, tokens in new_tokens.items():
            state = self.scheduler.requests[rid]
            msg = TokensMsg(rid, tokens, rid in done, state.finish_reason if rid in done else None, step=self.scheduler.step)
            publish(self.r, self.cfg.redis.out(rid), msg, maxlen=10_000)
        for rid in done:
            self.slots_used.pop(rid, None)
            entry = self.entry_of.pop(rid, None)
            if entry:
                self.r.xack(self.cfg.redis.requests, self.cfg.group, entry)
            del self.scheduler.requests[rid]

    # ---- drafting ------------------------------------------------------------------------------
    def _draft_io(self) -> tuple[float, float]:
        """Take the proposals that arrived (waiting, bounded, for last step's jobs), then ask for new ones.
        Returns the bounded wait's (start, end) on the monotonic clock."""
        if self.scheduler.step % 16 == 0:  # a lost draft worker only lowers speculation
            self.drafts_alive = any_alive(self.r, self.cfg.redis, "draft-")
        if not self.drafts_alive:
            self.awaiting.clear()
            now = time.monotonic()
            return now, now
        self._take_proposals(block_ms=None)
        waited = time.monotonic()
        deadline = waited + self.cfg.draft_wait_s
        while self.awaiting and (left := deadline - time.monotonic()) > 0:
            self._take_proposals(block_ms=max(1, int(left * 1000)))
        wait_span = (waited, time.monotonic())
        self.awaiting.clear()  # a job not answered in time is used whenever it arrives, never waited for again
        # jobs that need this step's events (a refill after a miss): answered once its step record is out, and
        # waited for before the next step, like the jobs for the level this step sends
        self._publish_jobs(as_of_step=self.scheduler.step + 1)
        return wait_span

    def _publish_jobs(self, as_of_step: int) -> None:
        """Expansion jobs for every node the scheduler wants drafted; the worker first applies step records up to
        `as_of_step` (that record's events are the tree the job describes)."""
        if not self.drafts_alive:
            return
        for job in self.scheduler.expansion_jobs():
            state = self.scheduler.requests[job.request_id]
            nodes = [[n.node_id, n.parent_id, n.token, n.position, int(n.accepted)] for n in job.nodes]
            msg = ExpansionJobMsg(job.request_id, as_of_step, job.text, nodes, job.top_k,
                                  self.scheduler.kv_capacity(state.request), self.run_.epoch)
            publish(self.r, self.cfg.redis.draft_jobs, msg)
            self.awaiting.update((job.request_id, n.node_id) for n in job.nodes)  # answered during the next step

    def _take_proposals(self, block_ms: int | None) -> None:
        for entry_id, raw in read(self.r, self.cfg.redis.proposals, self.proposals_last, block_ms=block_ms):
            self.proposals_last = entry_id
            p = decode_or_log(raw, ProposalsMsg, "scheduler")
            if p is not None and len(p.tokens) == len(p.logprobs):
                self.scheduler.add_proposals(p.request_id, p.node_id, list(zip(p.tokens, p.logprobs)))
                self.awaiting.discard((p.request_id, p.node_id))


def _not_running(stages: list[int]) -> str:
    if len(stages) == 1:
        return f"pipeline stage {stages[0]} is not running"
    return f"pipeline stages {', '.join(map(str, stages))} are not running"
