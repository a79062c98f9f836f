"""The gateway's added latency: time a request spends in the gateway and Redis, not in the model.

Two components, measured per request (exported as one Prometheus histogram,
`specpipe:gateway_added_latency_seconds`, label `component`):
  submit      HTTP request reaches the gateway (ASGI middleware, before the body is
              read) -> its RequestMsg is published (XADD returned): parsing,
              validation, tokenization, the readiness check, the publish.
  deliver     a TokensMsg is in the out stream (the ms part of its stream entry id is
              the Redis server's clock at XADD) -> the bytes that carry it are handed
              to the ASGI server: Redis, the gateway's blocking read, detokenization,
              the SSE write. One sample per written chunk (the entry that produced it);
              a non-streamed reply gives one sample, its last entry -> the response.
  round_trip  submit + the first deliver of the same request: one pass
              "gateway in -> Redis -> gateway out" with the model's time taken out.
Both clocks are this host's (Redis runs on the same machine in every setup here);
stream ids have millisecond resolution, so deliver reads 0.5 ms high on average.

Wiring: TimingMiddleware puts a RequestTiming in a context variable; TimedEngine
(an Engine) fills it in at submit and each time an out-stream entry arrives (Engine.entry_received);
the middleware's `send` wrapper closes the measurement when the body goes out.
"""

from __future__ import annotations

import dataclasses
import time
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.engine import Engine
from gateway.metrics import Metrics
from gateway.prompts import GenerationSpec
from gateway.records import RequestRecord
from gateway.state import GatewayState

NAME = "specpipe:gateway_added_latency_seconds"
BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
           0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
COMPONENTS = ("submit", "deliver", "round_trip")


@dataclass
class RequestTiming:
    """One HTTP request's timing state (mutable; shared by the middleware and the engine through a ContextVar)."""

    arrival: float  # perf_counter at the middleware
    submit_s: float | None = None
    entry_ms: int | None = None  # stream-id time of the last applied out-stream entry not yet written
    delivered: bool = False


CURRENT: ContextVar[RequestTiming | None] = ContextVar("specpipe_request_timing", default=None)


class AddedLatency:
    """The three histograms: one Prometheus family with a `component` label, in the metrics' registry."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        family = Histogram(NAME, "Latency the gateway and Redis add to a request, by component (seconds).",
                           [*labels, "component"], registry=registry, buckets=BUCKETS)
        self.hist = {c: family.labels(**labels, component=c) for c in COMPONENTS}

    def observe(self, component: str, seconds: float) -> None:
        self.hist[component].observe(max(seconds, 0.0))


class InstrumentedMetrics(Metrics):
    """Metrics plus the added-latency histogram family."""

    def __init__(self, base: Metrics):
        super().__init__(base.model_name, base.max_model_len, base.running, base.waiting, base.inflight)
        self.added = AddedLatency(self.registry, self.own_labels)


class TimedEngine(Engine):
    """Engine that reports submit time and the stream id of each applied entry to the request's timing."""

    def __init__(self, *args, added: AddedLatency, **kwargs):
        super().__init__(*args, **kwargs)
        self.added = added

    async def submit(self, request_id: str, spec: GenerationSpec) -> RequestRecord:
        record = await super().submit(request_id, spec)
        timing = CURRENT.get()
        if timing is not None:
            timing.submit_s = time.perf_counter() - timing.arrival
            self.added.observe("submit", timing.submit_s)
        return record

    def entry_received(self, entry_id: str) -> None:
        timing = CURRENT.get()
        if timing is not None:
            timing.entry_ms = int(entry_id.split("-", 1)[0])


class TimingMiddleware:
    """Pure ASGI middleware: stamps arrival, and closes a deliver measurement on every body write."""

    def __init__(self, app: ASGIApp, added: AddedLatency):
        self.app, self.added = app, added

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = RequestTiming(time.perf_counter())
        token = CURRENT.set(timing)

        async def timed_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and message.get("body") and timing.entry_ms is not None:
                self._delivered(timing, time.time() - timing.entry_ms / 1000)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            CURRENT.reset(token)

    def _delivered(self, timing: RequestTiming, seconds: float) -> None:
        timing.entry_ms = None
        self.added.observe("deliver", seconds)
        if not timing.delivered and timing.submit_s is not None:
            timing.delivered = True
            self.added.observe("round_trip", timing.submit_s + max(seconds, 0.0))


def instrument(state: GatewayState) -> GatewayState:
    """The same state with InstrumentedMetrics and a TimedEngine (add TimingMiddleware to the app too)."""
    metrics = InstrumentedMetrics(state.metrics)
    engine = TimedEngine(state.cfg, state.codec, state.queue, state.records, metrics, added=metrics.added)
    return dataclasses.replace(state, metrics=metrics, engine=engine)
