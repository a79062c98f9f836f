"""`python -m scheduler`: the Scheduler state machine behind Redis streams.

Loop, one pipeline step per iteration:
  1. read new requests (consumer group: a request is acknowledged only when it
     finished or failed) and cancellations; admit those whose KV fits, refuse
     past the queue limit (scheduler/admission.py),
  2. send the drafts the events of the last verification, take their
     proposals, waiting (bounded) for the jobs published during the last step,
     then for a miss's refill levels, drafted round by round as the in-process
     executor drafts them (scheduler/drafts.py),
  3. schedule() and publish the StepMsg (the same events, admitted requests,
     stage 0's rows), then at once the jobs that expand the level it sends, so
     the drafts work while the stages compute,
  4. wait for the last stage's VerifyMsg of this step, verify, publish tokens.
A lost stage fails the in-flight requests and begins a new pipeline run
(scheduler/pipeline.py); steps go out only while every stage is in the run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from scheduler.admission import Admission, AdmissionConfig, Admitted
from scheduler.drafts import DraftChannel
from scheduler.pipeline import PipelineWatch, not_running
from scheduler.scheduler import Request, Scheduler, StepResult
from scheduler.telemetry import Telemetry
from shared.transport.membership import trim_old_runs
from shared.transport.redis_io import (
    RedisConfig,
    connect,
    decode_or_log,
    ensure_group,
    publish,
    publish_all,
    read,
    start_heartbeat,
    tail_id,
)
from shared.types.batch import PipelineEvent
from shared.types.errors import ConfigError, SpecPipeError
from shared.wire.messages import (
    AdmittedRequest,
    CancelMsg,
    RequestMsg,
    SamplingFields,
    StageErrorMsg,
    StepMsg,
    TokensMsg,
    VerifyMsg,
)

log = logging.getLogger("scheduler")
OUT_MAXLEN = 10_000  # entries kept per request's out stream


@dataclass(frozen=True)
class SchedulerServiceConfig:
    redis: RedisConfig
    stages: int
    admission: AdmissionConfig = AdmissionConfig()
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
        self.admission = Admission(cfg.admission)
        self.drafts = DraftChannel(self.r, cfg.redis, scheduler, cfg.draft_wait_s)
        self.telemetry = Telemetry(self.r, cfg.redis, cfg.stages, cfg.stats_interval_s)
        self.pipeline = PipelineWatch(self.r, cfg.redis, cfg.stages)
        self.entry_of: dict[str, str] = {}  # request -> its requests-stream entry, acknowledged when it ends
        self.admitted: list[AdmittedRequest] = []  # admitted since the last StepMsg; stages register them first
        self.events: list[PipelineEvent] = []  # to apply before the next step (verification, cancels)
        self.verify_last = self.errors_last = self.cancel_last = "$"
        self.link_lost = False  # a stage reported a lost peer in this run
        self.stage_failures: list[StageErrorMsg] = []  # request-level failures read, not yet applied

    # ---- the loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        """A new run: older runs' per-step messages go, requests the last scheduler held are recovered."""
        ensure_group(self.r, self.cfg.redis.requests, self.cfg.group, "0")
        trimmed = trim_old_runs(self.r, self.cfg.redis)
        self._begin_run()
        self.drafts.start()
        self.verify_last = tail_id(self.r, self.cfg.redis.verify)
        self.errors_last = tail_id(self.r, self.cfg.redis.errors)
        self.cancel_last = tail_id(self.r, self.cfg.redis.cancel)
        log.info("scheduler: run %d began (%d messages of earlier runs trimmed)", self.pipeline.run.epoch, trimmed)
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
                busy = bool(self.scheduler.active()) and self.pipeline.formed
                self._ingest(block_ms=None if busy else 200)
                self._cancellations()
                self._admit()
                self.telemetry.stats(self.scheduler, self.admission.waiting_since())
                if not self.scheduler.active():
                    self.telemetry.events_known(self.events, drained=True)
                    if lost := self.pipeline.lost_while_idle():
                        self._reform(not_running(lost))
                    if stop_after_idle_s and time.monotonic() - idle_since > stop_after_idle_s:
                        return
                    continue
                idle_since = time.monotonic()
                if self.pipeline.ready():
                    self.step()
        finally:
            self.pipeline.end()

    def step(self) -> None:
        start, epoch = time.monotonic(), self.pipeline.run.epoch
        self.drafts.publish_events(epoch, self.scheduler.step + 1, self.events)
        wait_span = self.drafts.draft(epoch)
        self.telemetry.events_known(self.events, drained=False)
        batch = self.scheduler.schedule()
        self.telemetry.step_sent(self.scheduler.step, batch.rows)
        msg = StepMsg(step=self.scheduler.step, batch_id=batch.batch_id, events=self.events, admitted=self.admitted,
                      epoch=epoch, **StepMsg.columns(batch.rows))
        self.admitted, self.events = [], []
        published = time.monotonic()
        # the step, then the jobs for the level it sends (drafted while the stages compute), in one round trip
        publish_all(self.r, [(self.cfg.redis.steps, msg), *self.drafts.jobs(epoch)])
        verify = self._await_verify(msg.step)
        if verify is None:
            return
        verified = time.monotonic()
        result = self.scheduler.update_from_output(verify.target_tokens())
        self._stage_errors(result)  # after the verification: a request failed by a stage is not verified again
        self.events = result.events
        self._publish_tokens(result)
        stamps = (start, *wait_span, published, verified, time.monotonic())
        self.telemetry.step_timed(msg.step, len(batch.rows), stamps, drained=not self.scheduler.active())

    # ---- requests -----------------------------------------------------------------------------------
    def _ingest(self, block_ms: int | None) -> None:
        requests = {self.cfg.redis.requests: ">"}
        reply = self.r.xreadgroup(self.cfg.group, self.cfg.consumer, requests, count=64, block=block_ms)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._receive(entry_id.decode(), fields.get(b"m", b""))

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
        request = Request(msg.request_id, tuple(msg.prompt_ids), msg.sampling.params(), msg.max_new_tokens,
                          frozenset(msg.stop_ids) | self.stop_ids, policy)
        self.scheduler.check(request)
        return request

    def _admit(self) -> None:
        for a in self.admission.admit(self.scheduler.kv_capacity):
            self.scheduler.add_request(a.request)
            self.admitted.append(_admitted(a))

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

    def _cancellations(self) -> None:
        """Cancelled requests leave at once: waiting ones are dropped, running ones free their KV and tree."""
        result = StepResult()
        for entry_id, raw in read(self.r, self.cfg.redis.cancel, self.cancel_last, block_ms=None):
            self.cancel_last = entry_id
            msg = decode_or_log(raw, CancelMsg, "scheduler")
            if msg is None:
                continue
            rid = msg.request_id
            if self.admission.withdraw(rid) or self.scheduler.abort(rid, "cancelled", result):
                self._end(rid, "cancelled")
        self.events += result.events

    def _publish_tokens(self, result: StepResult) -> None:
        done = set(result.finished)
        messages = []
        for rid, tokens in result.new_tokens.items():
            state = self.scheduler.requests[rid]
            reason = state.finish_reason if rid in done else None
            messages.append((self.cfg.redis.out(rid), TokensMsg(request_id=rid, tokens=tokens, finished=rid in done,
                                                                finish_reason=reason, step=self.scheduler.step)))
        publish_all(self.r, messages, maxlen=OUT_MAXLEN)  # every request's tokens of this step in one round trip
        for rid in done:
            self.scheduler.remove(rid)
            self._end(rid, None)

    def _end(self, rid: str, reason: str | None, error: str | None = None) -> None:
        """A request leaves: its last message (unless its final tokens said it), its entry acknowledged, its KV
        freed. The one teardown for every way a request ends."""
        if reason is not None:
            msg = TokensMsg(request_id=rid, tokens=[], finished=True, finish_reason=reason, error=error)
            publish(self.r, self.cfg.redis.out(rid), msg, maxlen=OUT_MAXLEN)
        entry = self.entry_of.pop(rid, None)
        if entry:
            self.r.xack(self.cfg.redis.requests, self.cfg.group, entry)
        self.admission.release(rid)

    # ---- the stages -------------------------------------------------------------------------------------
    def _await_verify(self, step: int) -> VerifyMsg | None:
        """The last stage's output of `step`; None when the pipeline broke (in-flight requests failed, new run).

        A stage that lost its link reports it at once; the broken pipeline is then blamed on a stage whose
        heartbeat stops within one heartbeat lifetime, else on the link itself."""
        deadline, link_lost_at = time.monotonic() + self.cfg.verify_timeout_s, None
        while (now := time.monotonic()) < deadline:
            for entry_id, raw in read(self.r, self.cfg.redis.verify, self.verify_last, block_ms=250):
                self.verify_last = entry_id
                msg = decode_or_log(raw, VerifyMsg, "scheduler")
                if msg is not None and msg.step == step and msg.epoch == self.pipeline.run.epoch:
                    return msg
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
        """The errors stream: request failures wait for _stage_errors; a lost link is noted at once."""
        for entry_id, raw in read(self.r, self.cfg.redis.errors, self.errors_last, block_ms=None):
            self.errors_last = entry_id
            msg = decode_or_log(raw, StageErrorMsg, "scheduler")
            if msg is not None and msg.link_lost:
                self.link_lost = True
            elif msg is not None:
                self.stage_failures.append(msg)

    def _stage_errors(self, result: StepResult) -> None:
        """Fail the requests a stage could not compute (KV full, protocol error, ...)."""
        self._read_stage_errors()
        for msg in self.stage_failures:
            for rid in msg.request_ids:
                if self.scheduler.abort(rid, "error", result):
                    self._end(rid, "error", f"stage {msg.stage}: {msg.error}")
        self.stage_failures = []

    def _begin_run(self) -> None:
        self.pipeline.begin(base_step=self.scheduler.step)
        self.drafts.begin_run(self.pipeline.run.epoch, self.scheduler.step)
        self.events, self.telemetry.sent = [], None
        self.link_lost, self.stage_failures = False, []

    def _reform(self, reason: str) -> None:
        """A stage was lost: the requests in the pipe fail with `reason`, and a new run re-forms the pipeline.
        Requests admitted but never sent stay for the next run; every process starts it empty."""
        not_sent = {a.request_id for a in self.admitted}
        in_pipe = [s.request.request_id for s in self.scheduler.active() if s.request.request_id not in not_sent]
        log.error("scheduler: %s; failing %d in-flight requests, re-forming the pipeline", reason, len(in_pipe))
        for rid in in_pipe:
            self.scheduler.abort(rid, "error", StepResult())  # its events are not sent: the next run starts empty
            self._end(rid, "error", f"{reason}; request failed")
        self._begin_run()
        log.info("scheduler: run %d began; waiting for every stage to join it", self.pipeline.run.epoch)


def _admitted(a: Admitted) -> AdmittedRequest:
    r = a.request
    return AdmittedRequest(r.request_id, a.slot, len(r.prompt), a.capacity, SamplingFields.of(r.sampling))
