"""A small bounded run of benchmarks/load_gateway.py: 64 concurrent streaming clients, loopback only.

The cluster is specpipe.cluster.commands' (tiny-random, 2 stages, n-gram draft, gateway), with a small
scheduler --max-queue so that some requests are refused: every request must complete or get a clean
429, none lost, and the gateway's added-latency histogram must have one round trip per request.
"""

from __future__ import annotations

import pytest

from benchmarks.load_gateway import LoadConfig, quantile, report, run

pytestmark = pytest.mark.multiproc


def test_64_streaming_clients_complete_or_get_a_clean_429(tmp_path) -> None:
    cfg = LoadConfig(model="tiny-random", clients=64, requests=128, max_tokens=8, max_queue=16, duration_s=60)
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
    assert "**added latency p50 / p99**" in text and "| 429 (queue full, clean) |" in text


@pytest.mark.unit
def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.005, 90.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.002)
    assert quantile(buckets, 0.7) == pytest.approx(0.002 + 0.003 * 0.5)
    assert quantile(buckets, 0.99) == pytest.approx(0.005 + 0.005 * 0.9)
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.99) is None
    assert quantile([(0.1, 0.0), (float("inf"), 4.0)], 0.5) == 0.1  # past the last bound: that bound
