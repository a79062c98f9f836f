"""Prometheus text exposition (format 0.0.4) with vLLM's metric names, written by hand.

Every series carries model_name="<served model>" as vLLM's do. Histograms
follow vLLM's buckets. Latencies are measured in the gateway:
  time to first token   submission -> first out-stream message with tokens
  inter-token latency   gap between token groups, spread evenly over the group's tokens
                        (also exported as vllm:time_per_output_token_seconds)
  e2e request latency   submission -> finished
  request queue time    submission -> first out-stream message (upper bound: includes prefill;
                        the scheduler does not publish its admission time)
Speculation and pipeline series come from the scheduler's stats snapshot
(SchedulerStatsMsg), vLLM's spec-decode names plus SpecPipe's own:
  vllm:spec_decode_num_drafts_total, _num_draft_tokens_total, _num_accepted_tokens_total,
  _num_accepted_tokens_per_pos_total{position}  (position = depth below the last bonus token)
  specpipe:pipeline_steps_total, specpipe:tokens_per_step, specpipe:stage_busy_fraction{stage},
  specpipe:pruned_nodes_total, specpipe:computed_rows_total{fate="useful"|"wasted"},
  specpipe:scheduler_queue_depth
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Sequence

from shared.wire.messages import SchedulerStatsMsg

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


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


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0
        self.recent = RecentWindow()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1
        self.recent.add(value, time.monotonic())

    def render(self, labels: dict[str, str], name: str | None = None) -> list[str]:
        name = name or self.name
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
        lines.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines


class Metrics:
    """The gateway's counters and histograms; gauges are read from callables at scrape time."""

    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int],
                 inflight: Callable[[], int] = lambda: 0):
        self.labels = {"model_name": model_name}
        self.running, self.waiting, self.inflight = running, waiting, inflight
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             REQUEST_BUCKETS)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Time from submission to the first output message, in seconds.", REQUEST_BUCKETS)
        self.success: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def observe_tokens(self, gap_s: float, n: int) -> None:
        """A group of n tokens arrived gap_s after the previous group."""
        for _ in range(n):
            self.itl.observe(gap_s / n)

    def finished(self, reason: str) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1

    def render(self, stats: SchedulerStatsMsg | None = None) -> str:
        """The exposition; scheduler series only when a fresh stats snapshot is given."""
        lines: list[str] = []
        for hist in (self.ttft, self.itl, self.e2e, self.queue):
            lines += hist.render(self.labels)
        lines += self.itl.render(self.labels, "vllm:time_per_output_token_seconds")
        lines += ["# HELP vllm:request_success_total Finished requests by finish reason.",
                  "# TYPE vllm:request_success_total counter"]
        for reason, n in sorted(self.success.items()):
            lines.append(f"vllm:request_success_total{_labels({**self.labels, 'finished_reason': reason})} {n}")
        lines += self._scalar("vllm:num_requests_running", "gauge", "Requests generating tokens.", self.running())
        lines += self._scalar("vllm:num_requests_waiting", "gauge", "Requests submitted, no token yet.",
                              self.waiting())
        lines += self._scalar("specpipe:gateway_inflight_requests", "gauge",
                              "Generation requests in this gateway (its --max-inflight counts these).", self.inflight())
        lines += self._scalar("vllm:prompt_tokens_total", "counter", "Prompt tokens submitted.", self.prompt_tokens)
        lines += self._scalar("vllm:generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        if stats is not None:
            lines += self._scheduler_series(stats)
        return "\n".join(lines) + "\n"

    def _scheduler_series(self, st: SchedulerStatsMsg) -> list[str]:
        lines = self._scalar("vllm:spec_decode_num_drafts_total", "counter", "Speculative levels sent.", st.drafts)
        lines += self._scalar("vllm:spec_decode_num_draft_tokens_total", "counter", "Draft tokens sent into the pipe.",
                              st.draft_tokens)
        lines += self._scalar("vllm:spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.",
                              st.accepted)
        lines += self._labelled("vllm:spec_decode_num_accepted_tokens_per_pos_total", "counter",
                                "Accepted draft tokens by depth below the last bonus token.", "position",
                                st.accepted_per_depth)
        lines += self._scalar("specpipe:pipeline_steps_total", "counter", "Pipeline steps.", st.steps)
        lines += self._scalar("specpipe:tokens_per_step", "gauge", "Tokens generated per pipeline step.",
                              st.tokens / st.steps if st.steps else 0.0)
        lines += self._labelled("specpipe:stage_busy_fraction", "gauge",
                                "Fraction of pipeline steps in which the stage had rows to compute.", "stage",
                                st.stage_busy)
        lines += self._scalar("specpipe:pruned_nodes_total", "counter", "Tree nodes pruned.", st.pruned)
        lines += self._labelled("specpipe:computed_rows_total", "counter",
                                "Rows computed over all stages, by fate.", "fate",
                                {"useful": st.useful_rows, "wasted": st.wasted_rows})
        lines += self._scalar("specpipe:scheduler_queue_depth", "gauge", "Requests waiting for KV room.",
                              st.num_waiting)
        return lines

    def _labelled(self, name: str, kind: str, help: str, label: str, values) -> list[str]:
        items = values.items() if isinstance(values, dict) else enumerate(values)
        return [f"# HELP {name} {help}", f"# TYPE {name} {kind}"] + [
            f"{name}{_labels({**self.labels, label: str(k)})} {_num(v)}" for k, v in items
        ]

    def _scalar(self, name: str, kind: str, help: str, value: float) -> list[str]:
        return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{_labels(self.labels)} {_num(value)}"]
