"""SpecPipe-DB's dynamic width: how many tree nodes per level each request sends, from acceptance and cost.

A request that streams levels at width w accepts a level with probability
a(w) (the target's token is among the level's w best-scored nodes: a level's
nodes under the frontier's pruned siblings take part of its width too). A
miss costs a refill: the pipe's `stages` steps pass before the bonus token's
target returns, carrying `refill` drafted levels. Per cycle (one miss to the
next), with a = a(w), N = stages, R = refill levels:

    tokens = 1 + a + a^2 + ... + a^R + a^(R+1) / (1 - a)
    steps  = N + a^(R+1) / (1 - a)

so a request yields tokens/steps per step: 1/N at a = 0 (plain PP), up to 1.
A step costs the pipe's time at its rows (the slowest stage and the wire),
which grows with the widths; and where anything is drafted for it, the draft's
forward over the speculating requests' frontier nodes, if that is longer: the
draft works while the stages compute, so the slower of the two paces the step.
The plan picks the widths that maximise tokens per second over the decoding
requests: the k requests that gain most from width w speculate at w, the rest
send their roots only (as PP), and k = 0 under saturation, where a row of one
more request's root is worth more than a speculative row of another's tree, or
where the draft's forward alone costs more than the tokens it adds.

A refill's R levels are drafted after the miss, one sequential draft forward
per level, before its micro-batch can enter: where the draft is slow (a CPU,
a large draft) that wait costs more than the levels it saves, so the plan
chooses R too (0 = the bonus token alone, the levels then stream), from the
measured extra seconds of the steps that carried a refill of R levels.

Where the pipe never waits for the draft (PolicyConfig.draft_waits=False: it
runs beside, and a level enters once drafted), a step costs the pipe's time
alone, and a draft forward longer than a step streams each speculating
request's levels only every `pace` = draft / step steps:

    steps  = N + pace * a / (1 - a)      (R = 0: nothing is drafted below a bonus token yet)

Costs are learnt online (moving averages per power-of-two row count) from
the steps the driver reports (StepCosts): the pipe's by rows from every step,
the draft's by drafted rows from the steps it paced. Kept apart, one plan's
steps price every other plan: PP's are never charged a draft forward, and a
draft measured once is known at every width. Acceptance of a rank never
sent is guessed optimistically, so that a plan tries it once and learns.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

MAX_RANK = 8  # acceptance is counted for a level's 8 best-scored nodes (rank 7 = 8th best or worse)
PRIOR_WEIGHT = 4.0  # verifications' worth of the pooled acceptance in one request's estimate
PRIOR_ALPHA = 0.5  # acceptance assumed at rank 0 before any verification, halved per rank below
EWMA = 0.25  # weight of the newest step duration in its row bucket
MAX_ALPHA = 0.95  # an estimate of 1 would make a miss look impossible


@dataclass
class Acceptance:
    """Verifications of one request (or pooled): `tried[k]` levels sent with more than k nodes, `hits[k]` of them
    accepted the node of rank k in its level (0 = highest draft score)."""

    tried: list[int] = field(default_factory=lambda: [0] * MAX_RANK)
    hits: list[int] = field(default_factory=lambda: [0] * MAX_RANK)

    def record(self, sent: int, rank: int | None) -> None:
        for k in range(min(sent, MAX_RANK)):
            self.tried[k] += 1
        if rank is not None:
            self.hits[min(rank, MAX_RANK - 1)] += 1

    def alphas(self, width: int, prior: list[float]) -> list[float]:
        """P(accept) at widths 1..width: sums over ranks < w of P(hit at rank k), each rank estimated from the
        levels that sent it (a narrow level says nothing about rank k), shrunk towards the pooled `prior`
        (rank_rates of all requests)."""
        out, total = [], 0.0
        for k in range(min(width, MAX_RANK)):
            total += (self.hits[k] + PRIOR_WEIGHT * prior[k]) / (self.tried[k] + PRIOR_WEIGHT)
            out.append(min(total, MAX_ALPHA))
        return out + out[-1:] * (width - len(out))  # past the last rank counted, no more

    def rank_rates(self) -> list[float]:
        """Pooled P(hit at rank k); a rank never sent is assumed worth half the one above it (optimistic, so
        that a plan tries it once and learns)."""
        return [(self.hits[k] + PRIOR_ALPHA ** (k + 1)) / (self.tried[k] + 1) for k in range(MAX_RANK)]


def tokens_per_step(alpha: float, stages: int, refill: int, pace: float = 1.0) -> float:
    """Expected tokens a streaming request yields per pipeline step (module docstring); `pace`: steps per
    streamed level, where the draft runs beside the pipe unwaited and is slower than a step."""
    a = min(max(alpha, 0.0), MAX_ALPHA)
    tail = a ** (refill + 1) / (1 - a)
    return ((1 - a ** (refill + 1)) / (1 - a) + tail) / (stages + pace * tail)


@dataclass
class StepCosts:
    """Seconds per pipeline step by the most rows a micro-batch in the pipe had, learnt from reported steps.

    Per power-of-two bucket of rows, moving averages of the rows and the seconds. Between two measured
    buckets the cost is interpolated; outside them it follows a line fitted through all of them (never falling
    with rows). Below the narrowest bucket it is never dearer per row than there; with one bucket only, it is
    proportional to rows below it and flat above it: optimistic both ways, so that a plan tries and learns: a CPU's step grows about linearly with rows, a GPU's hardly at all."""

    points: dict[int, tuple[float, float]] = field(default_factory=dict)  # bucket -> (rows, seconds) averages
    unknown: float = 1.0  # seconds assumed before any step is measured
    flat_below: bool = False  # narrower than measured: as dear as the narrowest (a forward's fixed cost, as a draft's)
    _fit: tuple[list[tuple[float, float]], float, float] | None = None  # sorted points and their line, cached

    @classmethod
    def draft(cls) -> StepCosts:
        """A draft's seconds per level: unknown, it keeps up (0); narrower, no cheaper (a forward's fixed cost)."""
        return cls(unknown=0.0, flat_below=True)

    @staticmethod
    def bucket(rows: int) -> int:
        return max(0, math.ceil(math.log2(max(rows, 1))))

    def observe(self, rows: int, seconds: float) -> None:
        b = self.bucket(rows)
        old = self.points.get(b)
        new = (float(rows), seconds)
        self.points[b] = new if old is None else tuple((1 - EWMA) * o + EWMA * n for o, n in zip(old, new))
        self._fit = None

    def __call__(self, rows: float) -> float:
        """Expected seconds of a step under a plan that sends `rows` rows per step (1.0 when nothing is known)."""
        if not self.points:
            return self.unknown
        if self._fit is None:
            pts = sorted(self.points.values())
            self._fit = (pts, *_line(pts))
        pts, slope, intercept = self._fit
        (x0, y0), xn = pts[0], pts[-1][0]
        if rows < x0 and self.flat_below:
            return y0
        if rows < x0:  # narrower than anything measured: no dearer per row than at x0
            proportional = y0 * max(rows, 1) / x0
            return proportional if len(pts) == 1 else max(intercept + slope * rows, proportional)
        if rows > xn:  # wider: the line (flat with one point)
            return intercept + slope * rows
        i = bisect.bisect_left([x for x, _ in pts], rows)  # pts[i - 1] < rows <= pts[i]
        (xa, ya), (xb, yb) = pts[max(i - 1, 0)], pts[i]
        return yb if xb == xa else ya + (yb - ya) * (rows - xa) / (xb - xa)


def _line(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through the points, its slope clamped at >= 0 (flat through their mean if one)."""
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    slope = max(sum((x - mx) * (y - my) for x, y in pts) / var, 0.0) if var > 0 else 0.0
    return slope, my - slope * mx


@dataclass(frozen=True)
class Candidate:
    """One decoding request the plan may let speculate."""

    request_id: str
    max_width: int  # its policy's width, capped by its share of the token budget
    alphas: tuple[float, ...]  # P(accept a level) at widths 1..max_width
    max_refill: int  # its policy's refill depth

    def gain(self, width: int, refill: int, stages: int, pace: float = 1.0) -> float:
        """Tokens per step at this width (0: its root alone, as PP), refill depth and draft pace."""
        if width == 0:
            return 1 / stages
        return tokens_per_step(self.alphas[width - 1], stages, min(refill, self.max_refill), pace)

    def miss_rate(self, width: int, refill: int, stages: int) -> float:
        """Misses per step when speculating (one per cycle of N + streamed steps, module docstring)."""
        a = min(self.alphas[width - 1], MAX_ALPHA)
        return 1 / (stages + a ** (min(refill, self.max_refill) + 1) / (1 - a))


@dataclass(frozen=True)
class WidthPlan:
    widths: dict[str, int]  # per request planned
    default: int  # for a request that started decoding since: the width its speculating peers got
    step: int  # the step it was made for (it is made again 2 x `stages` steps later)
    informed: bool = True  # made knowing some step's cost; if not, it is made again once one is known
    rows: int = 0  # rows per step it sends (speculating requests' widths, the others' roots): its cost's key
    refill: int = 1 << 30  # drafted levels a speculating request's refill carries (capped by its policy's)

    def width_of(self, request_id: str) -> int:
        return self.widths.get(request_id, self.default)


def plan(candidates: list[Candidate], costs: StepCosts, stages: int, step: int = 0,
         draft_costs: StepCosts | None = None, refill_costs: StepCosts | None = None,
         draft_waits: bool = True) -> WidthPlan:
    """Widths and refill depth that maximise expected tokens per second of the whole batch (ties: the wider,
    deeper plan).

    For each width w and refill depth r, each request would speculate at min(w, its max width); the k requests
    that gain most do, the others send their roots only. k, w and r are chosen together. A step costs the pipe's
    costs(rows); where k > 0 the draft expands the speculating requests' frontier nodes meanwhile, so at least
    draft_costs(those nodes); plus refill_costs(r) (the refill's sequential drafting, where the pipe waits for it)
    when a speculating request misses in it. A draft never measured is assumed to keep up (optimistically, so
    that a plan tries it and learns).

    draft_waits=False: the pipe never waits for the draft (it runs beside, and a level enters when drafted), so a
    step costs the pipe's alone, a draft slower than a step streams each request's levels every `pace` steps
    (_beside), and a refill carries the bonus token alone (r = 0: nothing below it is drafted yet)."""
    draft_costs = draft_costs or StepCosts.draft()
    informed = bool(costs.points)  # a step's cost is known (else the plan is made again once it is)
    if not candidates:
        return WidthPlan({}, 0, step, informed)
    stages = max(stages, 1)
    refill_costs = refill_costs or StepCosts(unknown=0.0)

    def roots(k: int) -> int:  # rows of the requests not speculating, as PP: each root once every `stages` steps
        return math.ceil((len(candidates) - k) / stages)

    base = sum(c.gain(0, 0, stages) for c in candidates)
    best, best_w, best_r, best_rows = {}, 0, 0, roots(0)
    best_rate = base / costs(best_rows)
    for r in range(max(c.max_refill for c in candidates) + 1 if draft_waits else 1):
        refill = refill_costs(r) if r else 0.0
        for w in range(1, max(c.max_width for c in candidates) + 1):
            widths = {c.request_id: min(w, c.max_width) for c in candidates}
            gains = {c.request_id: c.gain(widths[c.request_id], r, stages) - c.gain(0, 0, stages) for c in candidates}
            ranked = sorted(candidates, key=lambda c: -gains[c.request_id])  # most gain first (at any pace)
            tokens, drafted, no_miss = base, 0, 1.0
            for k, c in enumerate(ranked, start=1):
                drafted += widths[c.request_id]
                if draft_waits:
                    tokens += gains[c.request_id]
                    no_miss *= 1 - c.miss_rate(widths[c.request_id], r, stages)
                    rows = drafted + roots(k)
                    seconds = max(costs(rows), draft_costs(drafted)) + (1 - no_miss) * refill
                else:  # the pace depends on k: the speculating requests' gains at it
                    seconds, pace, rows = _beside(costs, draft_costs, drafted, roots(k))
                    tokens = base - k / stages + sum(x.gain(widths[x.request_id], 0, stages, pace) for x in ranked[:k])
                if (rate := tokens / seconds) >= best_rate:
                    best, best_w, best_r, best_rate = {x.request_id: widths[x.request_id] for x in ranked[:k]}, w, r, rate
                    best_rows = math.ceil(rows)
    informed = informed and (bool(draft_costs.points) or not best)  # a draft never measured: again once it is
    return WidthPlan({c.request_id: best.get(c.request_id, 0) for c in candidates}, best_w, step, informed,
                     best_rows, best_r)


def _beside(costs: StepCosts, draft_costs: StepCosts, drafted: int, roots: int) -> tuple[float, float, float]:
    """(seconds per step, steps per streamed level, rows per step) where the draft runs beside the pipe unwaited:
    the pipe steps at its own pace, and a draft forward over the `drafted` frontier nodes that is slower than a
    step sends each speculating request's next level only every `pace` steps (its rows spread over them)."""
    rows = float(drafted + roots)
    for _ in range(2):  # the step's cost and the pace depend on each other: two rounds settle it
        pace = max(1.0, draft_costs(drafted) / max(costs(rows), 1e-9))
        rows = drafted / pace + roots
    return costs(rows), pace, rows
