"""Submitting a request and following its out stream: the gateway's one generation loop.

Engine.submit checks readiness (heartbeats) and publishes the RequestMsg.
Engine.updates yields one Update per TokensMsg (an accepted token group) with
the new text, until the request finishes, a stop string ends it, the request
times out, or the consumer goes away; in the last case (and for a stop
string or a timeout) it publishes a CancelMsg so the pipeline frees the
request. It keeps the request's record and the metrics up to date.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio

from gateway.codec import TextCodec
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.metrics import Metrics
from gateway.outstreams import Subscription
from gateway.prompts import GenerationSpec
from gateway.queue import AsyncQueue, QueueError
from gateway.records import FINISHED, RUNNING, RecordBook, RequestRecord
from gateway.textstream import TextAssembler
from shared.types.batch import TokenLogprob
from shared.wire.messages import RequestMsg, TokensMsg

log = logging.getLogger("gateway")
POLL_S = 0.25  # longest wait for out-stream entries: disconnects and deadlines are checked at least this often


@dataclass(frozen=True)
class Update:
    """One step of a request's output: new text, new token count, and whether (and why) it ended."""

    delta: str
    new_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    tokens: tuple[int, ...] = ()  # the new tokens themselves
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token when the request asked for logprobs


@dataclass
class _Run:
    record: RequestRecord
    text: TextAssembler
    started: float = field(default_factory=time.monotonic)
    last_tokens_at: float | None = None
    last_id: str = "0"
    done: bool = False
    first_seen: bool = False  # an out-stream message arrived: the scheduler has read the request
    queue_timed: bool = False


def outcome_error(update: Update, cfg: GatewayConfig, request_id: str) -> APIError | None:
    """The HTTP error for a request that ended badly (queue full, pipeline error, timeout), else None."""
    headers = {"X-Request-Id": request_id}
    if update.finish_reason == "queue_full":
        return APIError(429, "the scheduler's queue is full; retry later", code="queue_full",
                        headers={**headers, "Retry-After": str(cfg.retry_after_s)})
    if update.finish_reason == "error":
        return APIError(503, f"the pipeline could not complete the request: {update.error}", code="pipeline_error",
                        headers=headers)
    if update.finish_reason == "timeout":
        return APIError(504, update.error or "request timed out", code="timeout", headers=headers)
    if update.finish_reason == "cancelled":  # by POST /v1/requests/{id}/cancel: OpenAI has no finish_reason for it
        return APIError(499, "the request was cancelled before it completed", code="request_cancelled",
                        headers=headers)
    return None


class Engine:
    def __init__(self, cfg: GatewayConfig, codec: TextCodec, queue: AsyncQueue, records: RecordBook,
                 metrics: Metrics):
        self.cfg, self.codec, self.queue, self.records, self.metrics = cfg, codec, queue, records, metrics

    async def submit(self, request_id: str, spec: GenerationSpec) -> RequestRecord:
        """Publish the request; 503 when Redis or a pipeline component is not there."""
        try:
            missing = await self.queue.missing_components()
            if missing:
                raise APIError(503, f"the pipeline is not ready: no heartbeat from {', '.join(missing)}",
                               code="not_ready")
            entry_id = await self.queue.submit(RequestMsg(
                request_id=request_id, prompt_ids=list(spec.prompt_ids), max_new_tokens=spec.max_tokens,
                sampling=spec.sampling(), stop_ids=list(spec.stop_token_ids) + ([] if spec.ignore_eos else
                                                                                 list(self.codec.eos_ids)),
                ignore_eos=spec.ignore_eos, policy=spec.policy, width=spec.width, arrival=time.time()))
        except QueueError as exc:
            log.warning("submit %s: redis error: %s", request_id, exc)
            raise APIError(503, "the request queue is not reachable", code="queue_unavailable") from exc
        record = RequestRecord(request_id, self.cfg.model_name, len(spec.prompt_ids), entry_id=entry_id)
        self.records.add(record)
        self.metrics.prompt_tokens.inc(len(spec.prompt_ids))
        return record

    async def updates(self, record: RequestRecord, spec: GenerationSpec,
                      disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Update]:
        """Yield the request's updates until it ends; cancel it if the consumer stops early."""
        run = _Run(record, TextAssembler(self.codec, spec.stops))
        sub = None
        try:
            sub = await self.queue.follow(record.request_id, run.last_id)
            async with aclosing(self._follow(run, sub, disconnected)) as follow:
                async for update in follow:
                    yield update
        finally:
            if sub is not None:
                sub.close()
            if not run.done:
                with anyio.CancelScope(shield=True):
                    await self._end(run, "cancelled", "the client went away", cancel=True)

    async def _follow(self, run: _Run, sub: Subscription,
                      disconnected: Callable[[], Awaitable[bool]] | None) -> AsyncIterator[Update]:
        """The updates of one subscription, until the request ends, times out or the consumer goes."""
        deadline = run.started + self.cfg.request_timeout_s
        while not run.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                yield await self._end(run, "timeout", f"no completion within {self.cfg.request_timeout_s:g} s",
                                      cancel=True)
                return
            if disconnected is not None and await disconnected():
                return
            try:
                entries = await sub.get(min(POLL_S, remaining))
            except QueueError as exc:
                log.warning("request %s: redis error: %s", run.record.request_id, exc)
                yield await self._end(run, "error", "lost the connection to the request queue", cancel=False)
                return
            for entry_id, msg in entries:
                run.last_id = entry_id
                self.entry_received(entry_id)
                update = await self._apply(run, msg)
                yield update
                if update.finished:
                    return
                if run.first_seen and not run.queue_timed:  # after the first tokens went out, not before
                    await self._time_queue(run)

    def entry_received(self, entry_id: str) -> None:
        """Called with each out-stream entry's stream id just before the entry is applied and its update
        yielded (a hook: latency.TimedEngine times deliveries from it)."""

    async def _apply(self, run: _Run, msg: TokensMsg) -> Update:
        """Fold one TokensMsg into the run: record, metrics, text delta; end it on finish or a stop string."""
        now, record = time.monotonic(), run.record
        run.first_seen = True
        if msg.tokens:
            if run.last_tokens_at is None:
                self.metrics.ttft.observe(now - run.started)
                record.status = RUNNING
            else:
                self.metrics.observe_tokens(now - run.last_tokens_at, len(msg.tokens))
            run.last_tokens_at = now
            self.metrics.generation_tokens.inc(len(msg.tokens))
            record.tokens.extend(msg.tokens)
        delta = run.text.add(msg.tokens, msg.finished)
        record.text = run.text.text
        tokens, logprobs = tuple(msg.tokens), tuple(msg.logprobs)
        if run.text.stopped and not msg.finished:
            await self._end(run, "stop", None, cancel=True)
            return Update(delta, len(msg.tokens), True, "stop", None, tokens, logprobs)
        if msg.finished:
            reason = "stop" if run.text.stopped else msg.finish_reason or "stop"
            await self._end(run, reason, msg.error, cancel=False)
            return Update(delta, len(msg.tokens), True, reason, msg.error, tokens, logprobs)
        return Update(delta, len(msg.tokens), tokens=tokens, logprobs=logprobs)

    async def _time_queue(self, run: _Run) -> None:
        """Queue time: the request's XADD -> the scheduler's read of it (its first scheduler event that Redis
        timestamps; with KV room the scheduler admits it in the same pass). The scheduler publishes no admission
        time, so a wait for KV room after the read is not counted; a request the scheduler has acknowledged by
        then (it ended, e.g. within its first message) gives no sample."""
        run.queue_timed = True
        if run.record.entry_id is None:
            return
        try:
            seconds = await self.queue.queue_time(run.record.entry_id)
        except QueueError as exc:
            log.warning("request %s: could not read its queue time: %s", run.record.request_id, exc)
            return
        if seconds is not None:
            self.metrics.queue.observe(seconds)

    async def _end(self, run: _Run, reason: str, error: str | None, cancel: bool) -> Update:
        """Mark the run finished (record, metrics); optionally cancel it in the pipeline."""
        run.done = True
        record = run.record
        record.status, record.finish_reason, record.error = FINISHED, reason, error
        self.metrics.e2e.observe(time.monotonic() - run.started)
        self.metrics.finished(reason, record.prompt_tokens, len(record.tokens))
        try:
            if cancel:
                await self.queue.cancel(record.request_id)
            await self.queue.expire(record.request_id, self.cfg.out_stream_ttl_s)
        except QueueError as exc:
            log.warning("request %s: could not cancel/expire: %s", record.request_id, exc)
        return Update("", 0, True, reason, error)
