"""Prometheus text exposition (format 0.0.4) with vLLM's metric names, written by hand.

Every series carries model_name="<served model>" as vLLM's do. Histograms
follow vLLM's buckets. Latencies are measured in the gateway:
  time to first token   submission -> first out-stream message with tokens
  inter-token latency   gap between token groups, spread evenly over the group's tokens
                        (also exported as vllm:time_per_output_token_seconds)
  e2e request latency   submission -> finished
  request queue time    submission -> first out-stream message (upper bound: includes prefill;
                        the scheduler does not publish its admission time)
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

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


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

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

    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int]):
        self.labels = {"model_name": model_name}
        self.running, self.waiting = running, waiting
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

    def render(self) -> str:
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
        lines += self._scalar("vllm:prompt_tokens_total", "counter", "Prompt tokens submitted.", self.prompt_tokens)
        lines += self._scalar("vllm:generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        return "\n".join(lines) + "\n"

    def _scalar(self, name: str, kind: str, help: str, value: float) -> list[str]:
        return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{_labels(self.labels)} {_num(value)}"]
