"""`python -m scheduler`: the Scheduler state machine between Redis (the durable queue) and the control path.

One pipeline step per iteration, the beat first and Redis in its shadow:
  1. take the drafts' proposals, waiting (bounded) for the jobs published during the last step, then for a
     miss's refill levels, drafted round by round as the in-process executor drafts them (scheduler/drafts.py),
  2. schedule() and send the StepMsg (the last verification's events, admitted requests, stage 0's rows) to
     every stage over the control path (shared/transport/control.py),
  3. while the stages compute: publish the last step's tokens (a request's first ones went out at once, for
     its time to first token), the drafts' events and the jobs that expand the level just sent, read new
     requests (consumer group: a request is acknowledged only when it finished or failed), cancellations and
     stage errors; admit those whose KV fits, refuse past the queue limit (scheduler/admission.py); telemetry,
  4. wait for the last stage's VerifyMsg of this step on the control inbox, verify.
So a beat costs schedule(), one send, the stages' compute and one receive: no Redis round trip. Under async
scheduling (--async-scheduling, PolicyConfig.async_scheduling) step 4 waits for the verification of the step
before, not of the step just sent: the stages find step t + 1 in their inboxes as they finish step t, and the
scheduler's whole loop runs in the shadow of their compute. A lost stage
fails the in-flight requests and begins a new pipeline run (scheduler/pipeline.py); steps go out only while
every stage is in the run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import redis
from redis.client import Pipeline

from scheduler.admission import Admission, AdmissionConfig, Admitted
from scheduler.drafts import DraftChannel
from scheduler.local_drafts import LocalDrafts
from scheduler.pipeline import PipelineWatch, not_running
from scheduler.scheduler import Request, Scheduler, StepResult
from scheduler.telemetry import Telemetry
from shared.transport.control import ControlConfig, Inbox, Outbox
from shared.transport.membership import trim_old_runs
from shared.transport.redis_io import (
    SCHEDULER_GROUP,
    RedisConfig,
    connect,
    decode_or_log,
    ensure_group,
    entries_of,
    publish_all,
    read,
    start_heartbeat,
    tail_id,
)
from shared.types.batch import PipelineEvent
from shared.types.errors import ConfigError, SpecPipeError
from shared.types.speculation import SpeculativeSource
from shared.wire.messages import (
    AdmittedRequest,
    CancelMsg,
    ProposalsMsg,
    RequestMsg,
    SamplingFields,
    StageErrorMsg,
    StepMsg,
    TokensMsg,
    VerifyMsg,
)

log = logging.getLogger("scheduler")
OUT_MAXLEN = 10_000  # entries kept per request's out stream
LIVENESS_CHECK_S = 0.25  # while waiting for a verification, how often the stages' heartbeats are looked at


@dataclass(frozen=True)
class SchedulerServiceConfig:
    redis: RedisConfig
    stages: int
    admission: AdmissionConfig = AdmissionConfig()
    verify_timeout_s: float = 120.0
    # Before scheduling a step, wait up to this long for the proposals of the jobs published during the previous
    # step (the draft expands level t while the stages compute step t, so a draft about as fast as a step is
    # ready in time). 0 never waits: the draft runs beside the pipe and a level enters once drafted (a draft
    # slower than a step then streams a level every few steps; the width plan prices that pace, PolicyConfig).
    # Where the policy leaves it to the width plan (draft_waits=None), this bounds the steps of plans that wait.
    draft_wait_s: float = 1.0
    # A request the scheduler before this one took and never finished is queued again when it is younger than
    # this and none of its output went out; otherwise it is failed cleanly (its client is gone or has part of it).
    recover_within_s: float = 600.0
    stats_interval_s: float = 0.5  # how often the stats snapshot (metrics, dashboard) is rewritten
    group: str = SCHEDULER_GROUP
    consumer: str = "scheduler-0"
    control: ControlConfig = ControlConfig()  # this scheduler's control inbox (verifications, proposals)
    trace_steps: bool = False  # also write every StepMsg to the `steps` stream (off the beat): tests, debugging

    def __post_init__(self) -> None:
        if self.draft_wait_s < 0:
            raise ConfigError("the draft wait must be >= 0 (0: never wait)")


class SchedulerService:
    def __init__(self, cfg: SchedulerServiceConfig, scheduler: Scheduler, stop_ids: frozenset[int],
                 local_draft: SpeculativeSource | None = None):
        """`local_draft`: a lookup draft answered in this process (LocalDrafts); None: the draft workers'."""
        self.cfg, self.scheduler, self.stop_ids = cfg, scheduler, stop_ids
        self.r = connect(cfg.redis)
        self.admission = Admission(cfg.admission)
        self.inbox = Inbox(cfg.control)  # VerifyMsg from the last stage, ProposalsMsg from the drafts
        self.stages = Outbox()  # every stage's inbox, connected once the run has formed
        self.telemetry = Telemetry(self.r, cfg.redis, cfg.stages, cfg.stats_interval_s)
        self.drafts: DraftChannel | LocalDrafts = (
            LocalDrafts(scheduler, local_draft, timed=self.telemetry.draft_timed) if local_draft is not None
            else DraftChannel(self.r, cfg.redis, scheduler, cfg.draft_wait_s, receive=self._poll_control))
        self.pipeline = PipelineWatch(self.r, cfg.redis, cfg.stages, self.inbox.address, cfg.admission.kv_slots)
        self.entry_of: dict[str, str] = {}  # request -> its requests-stream entry, acknowledged when it ends
        self.admitted: list[AdmittedRequest] = []  # admitted since the last StepMsg; stages register them first
        self.events: list[PipelineEvent] = []  # to apply before the next step (verification, cancels)
        self.verified: list[VerifyMsg] = []  # read from the inbox, not yet taken
        self.unsent: list[tuple[str, TokensMsg]] = []  # verified tokens, published in the next step's shadow
        self.errors_last = self.cancel_last = "$"
        self.link_lost = False  # a stage reported a lost peer in this run
        self.stage_failures: list[StageErrorMsg] = []  # request-level failures read, not yet applied
        self.sent: _Sent | None = None  # the last StepMsg sent by step(), for the width plan's step times
        self.verified_at: float | None = None  # when the last verification arrived (None: none since idle)

    # ---- the loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        """A new run: older runs' per-step messages go, requests the last scheduler held are recovered."""
        ensure_group(self.r, self.cfg.redis.requests, self.cfg.group, "0")
        trimmed = trim_old_runs(self.r, self.cfg.redis)
        self._begin_run()
        self.errors_last = tail_id(self.r, self.cfg.redis.errors)
        self.cancel_last = tail_id(self.r, self.cfg.redis.cancel)
        log.info("scheduler: run %d began (%d messages of earlier runs trimmed)", self.pipeline.run.epoch, trimmed)
        self._recover()

    def run(self, stop_after_idle_s: float | None = None) -> None:
        self.start()
        start_heartbeat(self.cfg.redis, "scheduler")
        p = self.scheduler.policy
        mode = {True: "waits", False: "beside the pipe", None: "chosen by the width plan"}[p.draft_waits]
        log.info("scheduler ready: %s, %d stages, width %d, draft %s (wait %.0f ms)", p.name, p.stages, p.width, mode,
                 1000 * self.cfg.draft_wait_s)
        idle_since = time.monotonic()
        try:
            while True:
                if self.scheduler.active() and self.pipeline.ready():
                    idle_since = time.monotonic()
                    self.step()
                    continue
                self.sent = self.verified_at = None  # idle: the next step's time starts afresh
                self._flush_tokens()
                self._serve_queue(block_ms=200)
                if not self.scheduler.active():
                    self.telemetry.events_known(self.events, drained=True)
                    self.telemetry.flush()
                    if lost := self.pipeline.lost_while_idle():
                        self._reform(not_running(lost))
                    if stop_after_idle_s and time.monotonic() - idle_since > stop_after_idle_s:
                        return
        finally:
            self._flush_tokens()
            self.pipeline.end()

    def step(self) -> None:
        start, epoch = time.monotonic(), self.pipeline.run.epoch
        self.stages.connect(self.pipeline.stage_inboxes)  # a new run's inboxes, or a broken connection: made again
        self.drafts.publish_events(epoch, self.scheduler.step + 1, self.events)
        wait_span = self.drafts.draft(epoch)
        self.telemetry.events_known(self.events, drained=False)
        mode = self.scheduler.mode
        batch = self.scheduler.schedule()
        if self.scheduler.mode is not mode:
            log.debug("scheduler: %s from step %d (measured tokens/s by mode@load: %s)", self.scheduler.mode.value,
                      self.scheduler.step, _rates(self.scheduler.mode_check.snapshot()))
        self.telemetry.step_sent(self.scheduler.step, batch.rows)
        msg = StepMsg(step=self.scheduler.step, batch_id=batch.batch_id, events=self.events, admitted=self.admitted,
                      epoch=epoch, **StepMsg.columns(batch.rows))
        self.admitted, self.events = [], []
        self.stages.send(msg)
        published = time.monotonic()
        self._shadow(epoch, msg)
        self.scheduler.plan_ahead()  # the next step's widths, if due, while the stages compute
        verify_step = msg.step - self.scheduler.policy.lag  # async scheduling: the step before this one
        sent, self.sent = self.sent, _Sent(msg.step, published, wait_span[1] - wait_span[0])
        if verify_step <= self.pipeline.run.base_step:  # the run's first step under async scheduling
            return
        verify = self._await_verify(verify_step)
        if verify is None:
            return
        verified = time.monotonic()
        result = self.scheduler.update_from_output(verify.target_tokens())
        self._observe(verify_step, start, verified, sent)
        self.events += result.events  # after any cancellation's, read in the shadow
        self._finish_step(result)
        self._stage_errors()  # after the verification's tokens went out: a failed request is not verified again
        stamps = (start, *wait_span, published, verified, time.monotonic())
        self.telemetry.step_timed(msg.step, len(batch.rows), stamps, drained=not self.scheduler.active())

    def _observe(self, step: int, start: float, verified: float, sent: _Sent | None) -> None:
        """The width plan's costs: how long `step` took, and how long the stages waited for the draft in it.
        In lockstep a step runs from this loop's start to its verification, its draft wait all stall; under
        async scheduling from the verification before to its own, and the stages waited only as far as its
        StepMsg went out after that verification, the draft's share of it at most."""
        if not self.scheduler.policy.lag:
            self.scheduler.observe_step(verified - start, self.sent.wait_s)
        elif sent is not None and sent.step == step and self.verified_at is not None:
            stall = min(sent.wait_s, max(0.0, sent.published - self.verified_at))
            self.scheduler.observe_step(verified - self.verified_at, stall, step=step)
        self.verified_at = verified

    def _shadow(self, epoch: int, msg: StepMsg) -> None:
        """Everything Redis, in one round trip, while the stages compute the step just sent: the last step's
        tokens, the drafts' events and jobs (the level just sent), telemetry; new requests, cancellations and
        stage errors read back and handled."""
        with self.r.pipeline(transaction=False) as pipe:
            self._flush_tokens(pipe)
            self.drafts.flush(epoch, pipe)
            if self.cfg.trace_steps:
                publish_all(pipe, [(self.cfg.redis.steps, msg)])
            self.telemetry.flush(pipe)
            self._queue_reads(pipe, block_ms=None)
            requests, cancels, errors = pipe.execute()[-3:]
        self._handle_reads(requests, cancels, errors)

    def _serve_queue(self, block_ms: int | None) -> None:
        """Idle, or a run not formed: new requests (waiting up to block_ms for one), cancellations, errors."""
        with self.r.pipeline(transaction=False) as pipe:
            self._queue_reads(pipe, block_ms)
            self._handle_reads(*pipe.execute())

    def _queue_reads(self, pipe: Pipeline, block_ms: int | None) -> None:
        """New requests (consumer group), cancellations, stage errors: three replies, in this order."""
        pipe.xreadgroup(self.cfg.group, self.cfg.consumer, {self.cfg.redis.requests: ">"}, count=64, block=block_ms)
        pipe.xread({self.cfg.redis.cancel: self.cancel_last}, count=256)
        pipe.xread({self.cfg.redis.errors: self.errors_last}, count=256)

    def _handle_reads(self, requests, cancels, errors) -> None:
        for entry_id, raw in entries_of(requests):
            self._receive(entry_id, raw)
        self._cancellations(entries_of(cancels))
        self._stage_error_entries(entries_of(errors))
        self._admit()
        self.telemetry.stats(self.scheduler, self.admission.waiting_since())

    # ---- requests -----------------------------------------------------------------------------------

    def _receive(self, entry_id: str, raw: bytes) -> None:
        msg = decode_or_log(raw, RequestMsg, "scheduler")
        if msg is None:
            self.r.xack(self.cfg.redis.requests, self.cfg.group, entry_id)
            return
        if msg.request_id in self.entry_of:  # the same id again: one request, one output stream (the first)
            log.warning("scheduler: duplicate request id '%s' dropped", msg.request_id)
            self.r.xack(self.cfg.redis.requests, self.cfg.group, entry_id)
            return
        self.entry_of[msg.request_id] = entry_id
        try:
            request = self._request(msg)
        except SpecPipeError as exc:
            self._end(msg.request_id, "error", str(exc))
            return
        if not self.admission.offer(request, time.monotonic()):
            self._end(msg.request_id, "queue_full", "queue full")
            return
        self._admit()  # at once: the queue limit counts only requests whose KV does not fit, not one read batch

    def _request(self, msg: RequestMsg) -> Request:
        policy = None
        if msg.policy is not None or msg.width is not None:
            base = self.scheduler.policy
            policy = dataclasses.replace(base, name=msg.policy or base.name, width=msg.width or base.width)
        stop_ids = frozenset(msg.stop_ids) | (frozenset() if msg.ignore_eos else self.stop_ids)
        request = Request(msg.request_id, tuple(msg.prompt_ids), msg.sampling.params(), msg.max_new_tokens,
                          stop_ids, policy)
        self.scheduler.check(request)
        return request

    def _admit(self) -> None:
        for a in self.admission.admit(self.scheduler.kv_capacity):
            self.scheduler.add_request(a.request)
            self.admitted.append(_admitted(a))
            self.drafts.admitted(self.pipeline.run.epoch, a.request)

    def _recover(self) -> None:
        """Requests the scheduler before this one (same consumer) took and never finished."""
        last = "0"
        while entries := self._pending_after(last):
            for entry_id, fields in entries:
                last = entry_id.decode()
                self._recover_one(last, (fields or {}).get(b"m", b""))

    def _pending_after(self, last: str) -> list:
        reply = self.r.xreadgroup(self.cfg.group, self.cfg.consumer, {self.cfg.redis.requests: last}, count=64)
        return [e for _, batch in reply or [] for e in batch]

    def _recover_one(self, entry_id: str, raw: bytes) -> None:
        msg = decode_or_log(raw, RequestMsg, "scheduler") if raw else None
        if msg is None:  # trimmed or malformed
            self.r.xack(self.cfg.redis.requests, self.cfg.group, entry_id)
            return
        self.entry_of[msg.request_id] = entry_id
        if self.r.exists(self.cfg.redis.out(msg.request_id)):
            self._end(msg.request_id, "error", "the scheduler restarted while this request ran; retry it")
        elif time.time() - msg.arrival > self.cfg.recover_within_s:
            self._end(msg.request_id, "error", "the scheduler restarted before this request ran; retry it")
        else:
            log.info("scheduler: request %s queued again after a restart", msg.request_id)
            del self.entry_of[msg.request_id]
            self._receive(entry_id, raw)

    def _cancellations(self, entries: list[tuple[str, bytes]]) -> None:
        """Cancelled requests leave at once: waiting ones are dropped, running ones free their KV and tree."""
        result = StepResult()
        for entry_id, raw in entries:
            self.cancel_last = entry_id
            msg = decode_or_log(raw, CancelMsg, "scheduler")
            if msg is None:
                continue
            rid = msg.request_id
            if self.admission.withdraw(rid) or self.scheduler.abort(rid, "cancelled", result):
                self._end(rid, "cancelled")
        self.events += result.events

    def _finish_step(self, result: StepResult) -> None:
        """A verification's tokens wait for the next step's shadow (or the idle loop), except a request's first
        ones: they go at once (time to first token), before the next step's drafting; finished requests leave
        the scheduler now."""
        done, first = set(result.finished), False
        for rid, tokens in result.new_tokens.items():
            state = self.scheduler.requests[rid]
            reason = state.finish_reason if rid in done else None
            first = first or len(state.output) == len(tokens)
            msg = TokensMsg(request_id=rid, tokens=tokens, logprobs=result.new_logprobs.get(rid, []),
                            finished=rid in done, finish_reason=reason, step=self.scheduler.step)
            self.unsent.append((self.cfg.redis.out(rid), msg))
        for rid in done:
            self.scheduler.remove(rid)
        if first:
            self._flush_tokens()

    def _flush_tokens(self, pipe: Pipeline | None = None) -> None:
        """Every verified token not yet published, then the finished requests' ends, in one round trip (the
        caller's, given its pipeline)."""
        unsent, self.unsent = self.unsent, []
        if not unsent:
            return
        own = pipe is None
        pipe = self.r.pipeline(transaction=False) if own else pipe
        publish_all(pipe, unsent, maxlen=OUT_MAXLEN)
        for _, msg in unsent:
            if msg.finished:
                self._end(msg.request_id, None, r=pipe)
        if own:
            pipe.execute()

    def _end(self, rid: str, reason: str | None, error: str | None = None, r: redis.Redis | None = None) -> None:
        """A request leaves: its last message (unless its final tokens said it), its entry acknowledged, its KV
        freed. The one teardown for every way a request ends (its Redis writes on `r`, a pipeline or not)."""
        r = r or self.r
        if reason is not None:
            self._flush_tokens()  # its verified tokens first
            msg = TokensMsg(request_id=rid, tokens=[], finished=True, finish_reason=reason, error=error)
            publish_all(r, [(self.cfg.redis.out(rid), msg)], maxlen=OUT_MAXLEN)
        entry = self.entry_of.pop(rid, None)
        if entry:
            r.xack(self.cfg.redis.requests, self.cfg.group, entry)
        self.admission.release(rid)

    # ---- the stages -------------------------------------------------------------------------------------
    def _poll_control(self, timeout_ms: int | None) -> None:
        """Poll the control inbox (None: no wait): proposals go to the drafts, verifications are kept."""
        for msg in self.inbox.recv(0 if timeout_ms is None else timeout_ms):
            if isinstance(msg, ProposalsMsg):
                self.drafts.take(msg)
            elif isinstance(msg, VerifyMsg):
                self.verified.append(msg)
            else:
                log.warning("scheduler: a %s on the control inbox; dropped", type(msg).__name__)

    def _verified(self, step: int) -> VerifyMsg | None:
        """This run's verification of `step`, if it has arrived (anything older is dropped; a later step's,
        read meanwhile under async scheduling, is kept for its turn)."""
        epoch, found = self.pipeline.run.epoch, None
        for msg in self.verified:
            if msg.step == step and msg.epoch == epoch:
                found = msg
        self.verified = [m for m in self.verified if m.epoch == epoch and m.step > step]
        return found

    def _await_verify(self, step: int) -> VerifyMsg | None:
        """The last stage's output of `step`; None when the pipeline broke (in-flight requests failed, new run).

        A stage that lost its link reports it at once; the broken pipeline is then blamed on a stage whose
        heartbeat stops within one heartbeat lifetime, else on the link itself."""
        deadline, link_lost_at = time.monotonic() + self.cfg.verify_timeout_s, None
        checked = time.monotonic()
        while (now := time.monotonic()) < deadline:
            self._poll_control(int(1000 * LIVENESS_CHECK_S))
            if (msg := self._verified(step)) is not None:
                return msg
            if now - checked < LIVENESS_CHECK_S:  # a proposal woke the wait: the heartbeats were looked at lately
                continue
            checked = now
            if lost := self.pipeline.lost():
                self._reform(not_running(lost))
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
        self._stage_error_entries(read(self.r, self.cfg.redis.errors, self.errors_last, block_ms=None))

    def _stage_error_entries(self, entries: list[tuple[str, bytes]]) -> None:
        """The errors stream: request failures wait for _stage_errors; a lost link is noted at once."""
        for entry_id, raw in entries:
            self.errors_last = entry_id
            msg = decode_or_log(raw, StageErrorMsg, "scheduler")
            if msg is not None and msg.link_lost:
                self.link_lost = True
            elif msg is not None:
                self.stage_failures.append(msg)

    def _stage_errors(self) -> None:
        """Fail the requests a stage could not compute (KV full, its grammar, a protocol error), as read so far;
        their finish events go out with the next step. Not on the verification's StepResult: _finish_step has
        taken it (a request it ended would be removed twice)."""
        result = StepResult()
        for msg in self.stage_failures:
            for rid in msg.request_ids:
                if self.scheduler.abort(rid, "error", result):
                    self._end(rid, "error", f"stage {msg.stage}: {msg.error}")
        self.stage_failures = []
        self.events += result.events

    def _begin_run(self) -> None:
        self.pipeline.begin(base_step=self.scheduler.step)
        self.drafts.begin_run(self.pipeline.run.epoch, self.scheduler.step)
        self.events, self.verified, self.telemetry.sent = [], [], None
        self.link_lost, self.stage_failures = False, []
        self.sent = self.verified_at = None

    def _reform(self, reason: str) -> None:
        """A stage was lost: the requests in the pipe fail with `reason`, and a new run re-forms the pipeline.
        Requests admitted but never sent stay for the next run; every process starts it empty."""
        self._flush_tokens()  # what was verified before the loss reaches its clients first
        not_sent = {a.request_id for a in self.admitted}
        in_pipe = [s.request.request_id for s in self.scheduler.active() if s.request.request_id not in not_sent]
        log.error("scheduler: %s; failing %d in-flight requests, re-forming the pipeline", reason, len(in_pipe))
        for rid in in_pipe:
            self.scheduler.abort(rid, "error", StepResult())  # its events are not sent: the next run starts empty
            self._end(rid, "error", f"{reason}; request failed")
        self._begin_run()
        log.info("scheduler: run %d began; waiting for every stage to join it", self.pipeline.run.epoch)


@dataclass(frozen=True)
class _Sent:
    step: int
    published: float  # when the StepMsg went out (time.monotonic())
    wait_s: float  # how long the draft was waited for before it was scheduled


def _admitted(a: Admitted) -> AdmittedRequest:
    r = a.request
    return AdmittedRequest(r.request_id, a.slot, len(r.prompt), a.capacity, SamplingFields.of(r.sampling))


def _rates(snapshot: dict[str, float]) -> str:
    return ", ".join(f"{key} {rate:.1f}" for key, rate in snapshot.items()) or "none yet"
