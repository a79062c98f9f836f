"""The width plan priced in one go (numpy, scheduler/width.py) against the plain scan it replaced: every plan
(refill depth, width, number of speculating requests) priced one at a time, the best kept with >=. The same
choice on every case of a seeded table, both where the pipe waits for the draft and where it runs beside."""

from __future__ import annotations

import bisect
import math
import random

import pytest

from scheduler.width import MAX_ALPHA, Candidate, StepCosts, plan

pytestmark = pytest.mark.unit


def _cost(costs: StepCosts, rows: float) -> float:
    """StepCosts.__call__ as a scalar scan (before it was priced over arrays), through its priced points."""
    if not costs.points:
        return costs.unknown
    pts = sorted(costs.priced_points())
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    slope = max(sum((x - mx) * (y - my) for x, y in pts) / var, 0.0) if var > 0 else 0.0
    intercept = my - slope * mx
    (x0, y0), xn = pts[0], pts[-1][0]
    if rows < x0 and costs.flat_below:
        return y0
    if rows < x0:
        proportional = y0 * max(rows, 1) / x0
        return proportional if n == 1 else max(intercept + slope * rows, proportional)
    if rows > xn:
        return intercept + slope * rows
    i = bisect.bisect_left([x for x, _ in pts], rows)
    (xa, ya), (xb, yb) = pts[max(i - 1, 0)], pts[i]
    return yb if xb == xa else ya + (yb - ya) * (rows - xa) / (xb - xa)


def _gain(c: Candidate, width: int, refill: int, stages: int, pace: float = 1.0) -> float:
    if width == 0:
        return 1 / stages
    a = min(max(c.alphas[width - 1], 0.0), MAX_ALPHA)
    tail = a ** (min(refill, c.max_refill) + 1) / (1 - a)
    return ((1 - a ** (min(refill, c.max_refill) + 1)) / (1 - a) + tail) / (stages + pace * tail)


def _miss_rate(c: Candidate, width: int, refill: int, stages: int) -> float:
    a = min(c.alphas[width - 1], MAX_ALPHA)
    return 1 / (stages + a ** (min(refill, c.max_refill) + 1) / (1 - a))


def _scan(candidates, costs, stages, draft_costs, refill_costs, draft_waits) -> tuple[dict[str, int], int, int, int]:
    """The plan as it was: (widths, default width, refill depth, rows)."""
    def roots(k: int) -> int:
        return math.ceil((len(candidates) - k) / stages)

    base = sum(_gain(c, 0, 0, stages) for c in candidates)
    best, best_w, best_r, best_rows = {}, 0, 0, roots(0)
    best_rate = base / _cost(costs, best_rows)
    for r in range(max(c.max_refill for c in candidates) + 1 if draft_waits else 1):
        refill = _cost(refill_costs, r) if r else 0.0
        for w in range(1, max(c.max_width for c in candidates) + 1):
            widths = {c.request_id: min(w, c.max_width) for c in candidates}
            gains = {c.request_id: _gain(c, widths[c.request_id], r, stages) - _gain(c, 0, 0, stages)
                     for c in candidates}
            ranked = sorted(candidates, key=lambda c: -gains[c.request_id])
            tokens, drafted, no_miss = base, 0, 1.0
            for k, c in enumerate(ranked, start=1):
                drafted += widths[c.request_id]
                if draft_waits:
                    tokens += gains[c.request_id]
                    no_miss *= 1 - _miss_rate(c, widths[c.request_id], r, stages)
                    rows = drafted + roots(k)
                    seconds = max(_cost(costs, rows), _cost(draft_costs, drafted)) + (1 - no_miss) * refill
                else:
                    rows = float(drafted + roots(k))
                    for _ in range(2):
                        pace = max(1.0, _cost(draft_costs, drafted) / max(_cost(costs, rows), 1e-9))
                        rows = drafted / pace + roots(k)
                    seconds = _cost(costs, rows)
                    tokens = base - k / stages + sum(_gain(x, widths[x.request_id], 0, stages, pace)
                                                     for x in ranked[:k])
                if (rate := tokens / seconds) >= best_rate:
                    best, best_w, best_r, best_rate = {x.request_id: widths[x.request_id] for x in ranked[:k]}, w, r, rate
                    best_rows = math.ceil(rows)
    return {c.request_id: best.get(c.request_id, 0) for c in candidates}, best_w, best_r, best_rows


def _learnt(rng: random.Random, fixed: float, per_row: float, buckets: int, flat_below: bool = False) -> StepCosts:
    costs = StepCosts(flat_below=flat_below)
    for _ in range(buckets):
        rows = rng.choice([1, 2, 3, 4, 8, 12, 16, 32, 64, 200])
        costs.observe(rows, fixed + per_row * rows * rng.uniform(0.7, 1.3))
    return costs


def _case(seed: int, requests: int, stages: int, waits: bool):
    rng = random.Random(seed)
    candidates = []
    for i in range(requests):
        width = rng.choice([1, 2, 4, 4, 8])
        alphas = sorted(min(rng.uniform(0.0, 1.0), 0.97) for _ in range(width))
        if rng.random() < 0.2:
            alphas = [0.0] * width  # a request that never accepts
        candidates.append(Candidate(f"r{i}", width, tuple(alphas), rng.choice([0, 1, 3, stages - 1])))
    step = rng.choice([0.004, 0.05, 0.5])
    costs = _learnt(rng, step, step * rng.choice([0.0, 0.005, 0.05, 0.3]), rng.randint(0, 4))
    draft = _learnt(rng, step * rng.choice([0.2, 1.0, 3.0]), step * 0.01, rng.randint(0, 3), flat_below=True)
    refill = _learnt(rng, step * rng.choice([0.5, 2.0]), 0.0, rng.randint(0, 2))
    return candidates, costs, stages, draft, refill, waits


# label: (seeds, requests, stages, the pipe waits for the draft)
CASES = {
    "one request, 4 stages, waiting": (range(40), 1, 4, True),
    "8 requests, 8 stages, waiting": (range(100, 140), 8, 8, True),
    "40 requests, 8 stages, waiting": (range(200, 215), 40, 8, True),
    "one request, 4 stages, beside": (range(300, 340), 1, 4, False),
    "8 requests, 8 stages, beside": (range(400, 440), 8, 8, False),
    "40 requests, 8 stages, beside": (range(500, 515), 40, 8, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_plan_chooses_as_the_scan_did(case) -> None:
    seeds, requests, stages, waits = CASES[case]
    speculating = 0
    for seed in seeds:
        candidates, costs, stages_, draft, refill, waits_ = _case(seed, requests, stages, waits)
        made = plan(candidates, costs, stages_, 0, draft, refill, waits_)
        assert (made.widths, made.default, made.refill, made.rows) == _scan(candidates, costs, stages_, draft,
                                                                           refill, waits_), seed
        speculating += any(made.widths.values())
    assert 0 < speculating < len(seeds)  # the table has plans of both kinds


def test_step_costs_over_arrays_are_the_scalar_costs() -> None:
    rng = random.Random(7)
    for flat in (False, True):
        for buckets in range(5):
            costs = _learnt(rng, 0.01, 0.002, buckets, flat_below=flat)
            rows = [0.5, 1, 2, 3, 5.5, 8, 16, 31, 64, 100, 500]
            assert [costs(x) for x in rows] == [_cost(costs, x) for x in rows]
