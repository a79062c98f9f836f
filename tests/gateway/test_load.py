"""Bounded runs of benchmarks/load_gateway.py against tiny-random, loopback only.

The cluster is specpipe.cluster.commands' (tiny-random, 2 stages, n-gram draft, gateway).
64 clients with a small scheduler --max-queue and KV budget: some requests are refused, every request must
complete or get a clean 429, none lost, and the gateway's added-latency histogram must have one
round trip per request. 512 clients at once against the gateway's default --max-inflight: no 5xx,
none hung, none lost (the gateway's Redis use does not grow with in-flight requests).
"""

from __future__ import annotations

import time

import pytest

from benchmarks.load_gateway import LoadConfig, quantile, report, run

pytestmark = pytest.mark.multiproc


def test_64_streaming_clients_complete_or_get_a_clean_429(tmp_path) -> None:
    # a small KV budget (a few requests at a time) so that requests wait and the queue of 16 fills
    cfg = LoadConfig(model="tiny-random", clients=64, requests=128, max_tokens=8, max_queue=16, kv_slots=256,
                     duration_s=60)
    s = run(cfg, log_dir=tmp_path)
    assert s["lost"] == 0, s["lost_examples"]
    assert s["sent"] == s["completed"] + s["rejected_429"] == 128
    assert s["completed"] > 0 and s["rejected_429"] > 0  # the small queue refused some, cleanly
    assert s["samples"]["submit"] == s["samples"]["round_trip"] == 128  # one pass through the gateway each
    assert s["samples"]["deliver"] >= 128
    p50, p99 = s["added"]["round_trip"][50], s["added"]["round_trip"][99]
    assert 0 < p50 <= p99 < 30
    text = report(s)
    (tmp_path / "report.md").write_text(text)
    assert "**added latency p50 / p99**" in text and "| 429 (clean: OpenAI error + Retry-After) |" in text


def test_512_streaming_clients_complete_in_full_or_get_a_clean_429(tmp_path) -> None:
    cfg = LoadConfig(model="tiny-random", clients=512, requests=512, max_tokens=4, duration_s=120,
                     request_timeout_s=90)
    start = time.monotonic()
    s = run(cfg, log_dir=tmp_path)
    kinds = ("completed", "rejected_429", "other_4xx", "server_5xx", "hung", "transport", "stream_error",
             "incomplete", "lost")
    print(f"512 streaming clients: sent {s['sent']}, " + ", ".join(f"{k} {s[k]}" for k in kinds)
          + f"; 429 by code {s['rejected_by_code']}; clients' wall {s['wall_s']:.1f} s, "
          f"with the cluster {time.monotonic() - start:.1f} s")
    (tmp_path / "report.md").write_text(report(s))
    assert s["server_5xx"] == s["hung"] == s["transport"] == s["lost"] == 0, s["lost_examples"]
    assert s["sent"] == s["completed"] + s["rejected_429"] == 512
    assert s["completed"] > 0
    gateway_log = (tmp_path / "gateway.log").read_text()
    assert "Too many connections" not in gateway_log and "redis error" not in gateway_log


@pytest.mark.unit
def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.005, 90.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.002)
    assert quantile(buckets, 0.7) == pytest.approx(0.002 + 0.003 * 0.5)
    assert quantile(buckets, 0.99) == pytest.approx(0.005 + 0.005 * 0.9)
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.99) is None
    assert quantile([(0.1, 0.0), (float("inf"), 4.0)], 0.5) == 0.1  # past the last bound: that bound
