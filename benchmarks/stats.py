"""A sample's summary, as the reports give it."""

from __future__ import annotations

import statistics


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile: the sorted sample's value at index int(q / 100 * n), capped at the last; None when
    the sample is empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def dist(values: list[float]) -> dict:
    """mean / p50 / p99 (nearest rank) / n of a sample; None entries when it is empty."""
    v = sorted(values)
    if not v:
        return {"n": 0, "mean": None, "p50": None, "p99": None}
    return {"n": len(v), "mean": statistics.fmean(v), "p50": statistics.median(v),
            "p99": v[min(len(v) - 1, max(0, -(-99 * len(v) // 100) - 1))]}
