"""The gateway's Prometheus metrics, kept by prometheus-client in a CollectorRegistry of their own (one per app).

vLLM's series carry vLLM's names, buckets and labels (model_name="<served model>", engine="0"):
  vllm:num_requests_running / _waiting         gauges: this gateway's requests with tokens / without any yet
  vllm:prompt_tokens_total, vllm:generation_tokens_total
  vllm:request_prompt_tokens, vllm:request_generation_tokens   histograms, per request that ran
  vllm:request_success_total{finished_reason}  stop | length | abort (cancelled, timed out) | error
  vllm:time_to_first_token_seconds             submission -> first out-stream message with tokens
  vllm:inter_token_latency_seconds             gap between token groups, spread evenly over the group's tokens
                                               (also exported as vllm:time_per_output_token_seconds)
  vllm:e2e_request_latency_seconds             submission -> finished
  vllm:request_queue_time_seconds              XADD of the request -> the scheduler's read of it (gateway/engine.py)
  vllm:spec_decode_num_drafts_total, _num_draft_tokens_total, _num_accepted_tokens_total,
  _num_accepted_tokens_per_pos_total{position} (position = depth below the last bonus token)
  vllm:kv_cache_usage_perc                     a fraction in [0, 1], as vLLM's: KV slots reserved by the requests a
                                               stage holds / the slots it may hold (shared/compute/kv_cache.py,
                                               KVUse), on the fullest stage: every stage holds every request, so
                                               the fullest one is where admission stops. No stage label: vLLM's
                                               series has one value per engine, and dashboards read it as such
SpecPipe's own (label model_name):
  specpipe:requests_ended_total{reason}        the gateway's reasons: stop, length, cancelled, timeout, error,
                                               queue_full
  specpipe:gateway_inflight_requests, specpipe:pipeline_steps_total, specpipe:tokens_per_step,
  specpipe:stage_busy_fraction{stage}, specpipe:pruned_nodes_total, specpipe:computed_rows_total{fate},
  specpipe:scheduler_queue_depth (and specpipe:gateway_added_latency_seconds, gateway/latency.py)
  specpipe:speculating                         1 while the width plan lets some request speculate, 0 while all
                                               decode plainly (scheduler/mode_check.py chose, or nobody gains)
  specpipe:mode_tokens_per_second{mode,load}   the mode check's measured rates behind that choice
  specpipe:stage_kv_cache_usage_perc{stage}    each stage's own KV use (the stage_busy_fraction style: a stage label)
The speculation and pipeline series come from the scheduler's stats snapshot (SchedulerStatsMsg), the KV series
from the stages' (StageStatsMsg), given to `exposition` at scrape time; without fresh ones they are left out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from shared.wire.messages import SchedulerStatsMsg, StageStatsMsg

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
VLLM_REASONS = ("stop", "length", "abort", "error")
TO_VLLM = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort", "error": "error"}
GATEWAY_REASONS = ("stop", "length", "cancelled", "timeout", "error", "queue_full")


def token_buckets(max_value: int) -> list[int]:
    """vLLM's 1-2-5 buckets up to max_value (the context length) for per-request token counts."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


class RecentWindow:
    """The samples of the last `horizon_s` seconds, for the dashboard's percentiles over time."""

    def __init__(self, horizon_s: float = 60.0, limit: int = 100_000):
        self.horizon_s = horizon_s
        self.samples: deque[tuple[float, float]] = deque(maxlen=limit)  # (monotonic time, value)

    def add(self, value: float, now: float) -> None:
        self.samples.append((now, value))

    def percentiles(self, qs: Sequence[float] = (50, 90, 99), now: float | None = None) -> dict[str, float | None]:
        now = time.monotonic() if now is None else now
        while self.samples and self.samples[0][0] < now - self.horizon_s:
            self.samples.popleft()
        values = sorted(v for _, v in self.samples)
        return {f"p{q:g}": values[min(len(values) - 1, int(q / 100 * len(values)))] if values else None for q in qs}


class Timing:
    """Histograms (one or more names for the same samples) and the recent window the dashboard reads."""

    def __init__(self, *children):
        self.children, self.recent = children, RecentWindow()

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)
        self.recent.add(value, time.monotonic())


class SchedulerSeries:
    """A collector of the scheduler's snapshot: `stats` is set for the duration of one exposition."""

    def __init__(self, vllm_labels: dict[str, str], own_labels: dict[str, str]):
        self.vllm, self.own = vllm_labels, own_labels
        self.stats: SchedulerStatsMsg | None = None

    def describe(self) -> list[Metric]:
        return []  # the names vary with the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        st = self.stats
        if st is None:
            return
        yield self._one(CounterMetricFamily, "vllm:spec_decode_num_drafts", "Speculative levels sent.", st.drafts)
        yield self._one(CounterMetricFamily, "vllm:spec_decode_num_draft_tokens", "Draft tokens sent into the pipe.",
                        st.draft_tokens)
        yield self._one(CounterMetricFamily, "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                        st.accepted)
        yield self._by(CounterMetricFamily, "vllm:spec_decode_num_accepted_tokens_per_pos",
                       "Accepted draft tokens by depth below the last bonus token.", "position",
                       dict(enumerate(st.accepted_per_depth)), self.vllm)
        yield from self._pipeline(st)

    def _pipeline(self, st: SchedulerStatsMsg) -> Iterator[Metric]:
        own = self.own
        yield self._one(CounterMetricFamily, "specpipe:pipeline_steps", "Pipeline steps.", st.steps, own)
        yield self._one(GaugeMetricFamily, "specpipe:tokens_per_step", "Tokens generated per pipeline step.",
                        st.tokens / st.steps if st.steps else 0.0, own)
        yield self._by(GaugeMetricFamily, "specpipe:stage_busy_fraction",
                       "Fraction of pipeline steps in which the stage had rows to compute.", "stage",
                       dict(enumerate(st.stage_busy)), own)
        yield self._one(CounterMetricFamily, "specpipe:pruned_nodes", "Tree nodes pruned.", st.pruned, own)
        yield self._by(CounterMetricFamily, "specpipe:computed_rows", "Rows computed over all stages, by fate.",
                       "fate", {"useful": st.useful_rows, "wasted": st.wasted_rows}, own)
        yield self._one(GaugeMetricFamily, "specpipe:scheduler_queue_depth", "Requests waiting for KV room.",
                        st.num_waiting, own)
        yield self._one(GaugeMetricFamily, "specpipe:speculating", "1 while the width plan lets some request "
                        "speculate, 0 while every request decodes plainly (PP's rows).", int(st.speculating), own)
        rates = GaugeMetricFamily("specpipe:mode_tokens_per_second", "The mode check's measured decode rate by mode "
                                  "(spec, plain) and load (decoding requests, power-of-two bucket).",
                                  labels=[*own, "mode", "load"])
        for key, rate in st.mode_rates.items():
            mode, load = key.split("@")
            rates.add_metric([*own.values(), mode, load], rate)
        yield rates

    def _one(self, kind, name: str, help: str, value: float, labels: dict[str, str] | None = None) -> Metric:
        labels = self.vllm if labels is None else labels
        family = kind(name, help, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family

    @staticmethod
    def _by(kind, name: str, help: str, label: str, values: dict, labels: dict[str, str]) -> Metric:
        family = kind(name, help, labels=[*labels, label])
        for key, value in values.items():
            family.add_metric([*labels.values(), str(key)], value)
        return family


class StageSeries:
    """A collector of the stages' snapshots: `stages` is set for the duration of one exposition."""

    def __init__(self, vllm_labels: dict[str, str], own_labels: dict[str, str]):
        self.vllm, self.own = vllm_labels, own_labels
        self.stages: Sequence[StageStatsMsg] = ()

    def describe(self) -> list[Metric]:
        return []  # present only with fresh snapshots

    def collect(self) -> Iterator[Metric]:
        known = sorted((s for s in self.stages if s.kv_slots > 0), key=lambda s: s.stage)  # budget known
        if not known:
            return
        fullest = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                    labels=list(self.vllm))
        fullest.add_metric(list(self.vllm.values()), max(s.kv_usage for s in known))
        yield fullest
        per_stage = GaugeMetricFamily("specpipe:stage_kv_cache_usage_perc",
                                      "Fraction of the stage's KV slots reserved by its requests.",
                                      labels=[*self.own, "stage"])
        for s in known:
            per_stage.add_metric([*self.own.values(), str(s.stage)], s.kv_usage)
        yield per_stage


class Metrics:
    """The gateway's series in `registry`; gauges read their callables at scrape time."""

    def __init__(self, model_name: str, max_model_len: int, running: Callable[[], int], waiting: Callable[[], int],
                 inflight: Callable[[], int] = lambda: 0):
        self.model_name, self.max_model_len = model_name, max_model_len
        self.running, self.waiting, self.inflight = running, waiting, inflight
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": "0"}  # vLLM's label set
        self.own_labels = {"model_name": model_name}
        self._gauges()
        self._latencies()
        self._tokens()
        self._reasons()
        self.scheduler = SchedulerSeries(self.labels, self.own_labels)
        self.registry.register(self.scheduler)
        self.stages = StageSeries(self.labels, self.own_labels)
        self.registry.register(self.stages)

    def _family(self, kind, name: str, help: str, extra: Sequence[str] = (), own: bool = False, **kwargs):
        labels = self.own_labels if own else self.labels
        return kind(name, help, [*labels, *extra], registry=self.registry, **kwargs)

    def _child(self, kind, name: str, help: str, own: bool = False, **kwargs):
        return self._family(kind, name, help, own=own, **kwargs).labels(**(self.own_labels if own else self.labels))

    def _gauges(self) -> None:
        self._child(Gauge, "vllm:num_requests_running", "Requests generating tokens.").set_function(self.running)
        self._child(Gauge, "vllm:num_requests_waiting", "Requests submitted, no token yet.").set_function(
            self.waiting)
        self._child(Gauge, "specpipe:gateway_inflight_requests",
                    "Generation requests in this gateway (its --max-inflight counts these).",
                    own=True).set_function(self.inflight)

    def _latencies(self) -> None:
        h = Histogram
        self.ttft = Timing(self._child(h, "vllm:time_to_first_token_seconds",
                                       "Histogram of time to first token in seconds.", buckets=TTFT_BUCKETS))
        self.itl = Timing(self._child(h, "vllm:inter_token_latency_seconds",
                                      "Histogram of inter-token latency in seconds.", buckets=ITL_BUCKETS),
                          self._child(h, "vllm:time_per_output_token_seconds",
                                      "Histogram of time per output token in seconds.", buckets=ITL_BUCKETS))
        self.e2e = Timing(self._child(h, "vllm:e2e_request_latency_seconds",
                                      "Histogram of e2e request latency in seconds.", buckets=REQUEST_BUCKETS))
        self.queue = Timing(self._child(h, "vllm:request_queue_time_seconds",
                                        "Histogram of time spent in WAITING phase for request.",
                                        buckets=REQUEST_BUCKETS))

    def _tokens(self) -> None:
        buckets = token_buckets(max(self.max_model_len, 1))
        self.prompt_tokens = self._child(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = self._child(Counter, "vllm:generation_tokens",
                                             "Number of generation tokens processed.")
        self.request_prompt = self._child(Histogram, "vllm:request_prompt_tokens",
                                          "Number of prefill tokens processed.", buckets=buckets)
        self.request_generation = self._child(Histogram, "vllm:request_generation_tokens",
                                              "Number of generation tokens processed.", buckets=buckets)

    def _reasons(self) -> None:
        success = self._family(Counter, "vllm:request_success", "Count of successfully processed requests.",
                               ["finished_reason"])
        self.success = {r: success.labels(**self.labels, finished_reason=r) for r in VLLM_REASONS}
        ended = self._family(Counter, "specpipe:requests_ended", "Requests ended, by the gateway's reason.",
                             ["reason"], own=True)
        self.ended_by = {r: ended.labels(**self.own_labels, reason=r) for r in GATEWAY_REASONS}
        self._ended_family = ended

    def observe_tokens(self, gap_s: float, n: int) -> None:
        """A group of n tokens arrived gap_s after the previous group."""
        for _ in range(n):
            self.itl.observe(gap_s / n)

    def finished(self, reason: str, prompt_tokens: int = 0, generation_tokens: int = 0) -> None:
        """A request ended for `reason` (the gateway's); a refused one (queue_full) counts in no vLLM series."""
        if reason not in self.ended_by:
            self.ended_by[reason] = self._ended_family.labels(**self.own_labels, reason=reason)
        self.ended_by[reason].inc()
        if reason in TO_VLLM:
            self.success[TO_VLLM[reason]].inc()
            self.request_prompt.observe(prompt_tokens)
            self.request_generation.observe(generation_tokens)

    def total(self, name: str) -> float:
        """A counter's value in this registry (the dashboard's totals)."""
        return self.registry.get_sample_value(name, self.labels) or 0.0

    def ended(self) -> dict[str, int]:
        """Requests ended so far by the gateway's reason (the ones that happened)."""
        counts = {r: int(self.registry.get_sample_value("specpipe:requests_ended_total",
                                                        {**self.own_labels, "reason": r}) or 0)
                  for r in self.ended_by}
        return {r: n for r, n in counts.items() if n}

    def exposition(self, stats: SchedulerStatsMsg | None = None, accept: str = "",
                   stages: Sequence[StageStatsMsg] = ()) -> tuple[bytes, str]:
        """(body, content type) for an Accept header; the scheduler series only when a fresh snapshot is given,
        the KV series only for the fresh stage snapshots given."""
        encoder, content_type = choose_encoder(accept)
        self.scheduler.stats, self.stages.stages = stats, stages
        try:
            return encoder(self.registry), content_type
        finally:
            self.scheduler.stats, self.stages.stages = None, ()
