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
the draft's forward by frontier nodes from its own reported times, and a
waited level (its queue behind the draft's prompts included) from the steps
it paced. Kept apart, one plan's
steps price every other plan: PP's are never charged a draft forward, and a
draft measured once is known at every width. Acceptance of a rank never
sent is guessed optimistically, so that a plan tries it once and learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

MAX_RANK = 8  # acceptance is counted for a level's 8 best-scored nodes (rank 7 = 8th best or worse)
PRIOR_WEIGHT = 4.0  # verifications' worth of the pooled acceptance in one request's estimate
PRIOR_ALPHA = 0.5  # acceptance assumed at rank 0 before any verification, halved per rank below
EWMA = 0.25  # weight of the newest step duration in its row bucket
MAX_ALPHA = 0.95  # an estimate of 1 would make a miss look impossible
TRUSTED = 3  # steps seen in a row bucket lately before its average may price it above what the others predict
FRESH = 128  # ... lately: within this many steps observed (one not seen since may be priced to be tried again)


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
    return float(_tokens(np.asarray(float(alpha)), np.ones((), dtype=int), stages, refill, pace))


@dataclass
class StepCosts:
    """Seconds per pipeline step by the most rows a micro-batch in the pipe had, learnt from reported steps.

    Per power-of-two bucket of rows, moving averages of the rows and the seconds. Between two measured
    buckets the cost is interpolated; outside them it follows a line fitted through all of them (never falling
    with rows). Below the narrowest bucket it is never dearer per row than there; with one bucket only, it is
    proportional to rows below it and flat above it: optimistic both ways, so that a plan tries and learns: a
    CPU's step grows about linearly with rows, a GPU's hardly at all.

    A bucket seen fewer than TRUSTED times in the last FRESH steps, between two that were, is priced no dearer
    than they predict: steps that ran slow for another reason (a new shape's first kernels, a prompt forward
    beside them, a busy host) would otherwise price their rows out of every plan, and they would never be
    measured again."""

    points: dict[int, tuple[float, float]] = field(default_factory=dict)  # bucket -> (rows, seconds) averages
    unknown: float = 1.0  # seconds assumed before any step is measured
    flat_below: bool = False  # narrower than measured: as dear as the narrowest (a forward's fixed cost, as a draft's)
    seen: dict[int, list[int]] = field(default_factory=dict)  # bucket -> when its last TRUSTED steps were observed
    clock: int = 0  # steps observed
    _fit: tuple | None = field(default=None, compare=False, repr=False)  # the points' curve (_curve): cached

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
        self.clock += 1
        self.seen[b] = [*self.seen.get(b, []), self.clock][-TRUSTED:]
        self._fit = None

    def __call__(self, rows: float) -> float:
        """Expected seconds of a step under a plan that sends `rows` rows per step (1.0 when nothing is known)."""
        return float(self.many(np.array([rows], dtype=float))[0])

    def many(self, rows: np.ndarray) -> np.ndarray:
        """__call__ at every element of `rows` at once (the plan prices all its candidate plans in one go)."""
        if not self.points:
            return np.full(rows.shape, self.unknown)
        if self._fit is None:
            self._fit = _curve(self.priced_points())
        return self._priced(rows, *self._fit)

    def priced_points(self) -> list[tuple[float, float]]:
        """The points, an untrusted one between trusted ones no dearer than they predict there (beyond them, what
        they predict is only a guess, no evidence against it)."""
        fresh = lambda b: len(self.seen.get(b, [])) == TRUSTED and self.clock - self.seen[b][0] < FRESH
        trusted = {b: p for b, p in self.points.items() if fresh(b)}
        if not trusted or len(trusted) == len(self.points):
            return list(self.points.values())
        curve = _curve(list(trusted.values()))
        narrowest, widest = curve[0][0], curve[0][-1]
        predicted = lambda x: float(self._priced(np.array([x]), *curve)[0])
        return [(x, min(y, predicted(x)) if b not in trusted and narrowest < x < widest else y)
                for b, (x, y) in self.points.items()]

    def _priced(self, rows: np.ndarray, xs: np.ndarray, ys: np.ndarray, slope: float, intercept: float) -> np.ndarray:
        """The cost at `rows` on the curve through the points (xs, ys) and their line."""
        line = intercept + slope * rows
        if self.flat_below:
            below = np.full(rows.shape, ys[0])
        else:  # narrower than anything measured: no dearer per row than at the narrowest
            proportional = ys[0] * np.maximum(rows, 1) / xs[0]
            below = proportional if len(xs) == 1 else np.maximum(line, proportional)
        i = np.clip(np.searchsorted(xs, rows, side="left"), 0, len(xs) - 1)  # xs[i - 1] < rows <= xs[i]
        a = np.maximum(i - 1, 0)
        xa, ya, xb, yb = xs[a], ys[a], xs[i], ys[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            between = np.where(xb == xa, yb, ya + (yb - ya) * (rows - xa) / (xb - xa))
        return np.where(rows < xs[0], below, np.where(rows > xs[-1], line, between))


def _curve(pts: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The points' rows and seconds, by rows, and their line (StepCosts._priced's arguments)."""
    pts = sorted(pts)
    return np.array([x for x, _ in pts]), np.array([y for _, y in pts]), *_line(pts)


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


@dataclass(frozen=True)
class WidthPlan:
    widths: dict[str, int]  # per request planned
    default: int  # for a request that started decoding since: the width its speculating peers got
    step: int  # the step it was made for (it is made again 2 x `stages` steps later)
    informed: bool = True  # made knowing some step's cost; if not, it is made again once one is known
    rows: int = 0  # rows per step it sends (speculating requests' widths, the others' roots): its cost's key
    refill: int = 1 << 30  # drafted levels a speculating request's refill carries (capped by its policy's)
    waits: bool = True  # the pipe waits for the draft's levels (False: the draft runs beside it, never waited for)

    def width_of(self, request_id: str) -> int:
        return self.widths.get(request_id, self.default)

    @property
    def speculates(self) -> bool:
        """Some request speculates under this plan (the mode check's SPEC); else every one decodes plainly."""
        return any(self.widths.values())

    def plain(self, stages: int) -> WidthPlan:
        """This plan with nobody speculating: every request's root, once per `stages` steps (PP's rows)."""
        return replace(self, widths=dict.fromkeys(self.widths, 0), default=0, refill=0,
                       rows=math.ceil(len(self.widths) / max(stages, 1)))


def plan(candidates: list[Candidate], costs: StepCosts, stages: int, step: int = 0,
         draft_costs: StepCosts | None = None, refill_costs: StepCosts | None = None,
         draft_waits: bool | None = True, draft_known: bool | None = None,
         wait_costs: StepCosts | None = None) -> WidthPlan:
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
    (_beside), and a refill carries the bonus token alone (r = 0: nothing below it is drafted yet).

    draft_waits=None: both, and the better one (waiting on a tie): the plan says which (WidthPlan.waits). A draft
    about as fast as a step is best waited for (its refills carry drafted levels); a slower one is best beside.
    While the draft's pace is unknown, beside only: trying it costs the pipe nothing, where a waited step behind a
    slow draft (and the prompts it drafts first) stalls every request.

    draft_known: whether the draft's pace is known (None: whether draft_costs has a measurement; the scheduler
    also knows it from a waited step the draft did not pace); a plan that speculates on an unknown one is made
    again once it is known (WidthPlan.informed). wait_costs: a waited level's drafting, where it differs from
    the draft's forward (None: draft_costs)."""
    draft_costs = draft_costs or StepCosts.draft()
    informed = bool(costs.points)  # a step's cost is known (else the plan is made again once it is)
    if not candidates:
        return WidthPlan({}, 0, step, informed)
    t = _Table(candidates, max(stages, 1))
    best_rate = t.base / float(costs.many(t.roots[:1])[0])  # nobody speculating
    known = bool(draft_costs.points) if draft_known is None else draft_known
    best, best_w, best_r, best_rows, waits = {}, 0, 0, int(t.roots[0]), draft_waits is not False
    modes = (draft_waits,) if draft_waits is not None else (True, False) if known else (False,)
    for mode in modes:  # waiting first: it wins a tie
        rates, rows, order = (_waiting(t, costs, wait_costs or draft_costs, refill_costs or StepCosts(unknown=0.0))
                              if mode else _beside(t, costs, draft_costs))
        if not rates.size or (top := rates.max()) < best_rate or (best and top == best_rate):
            continue
        last = rates.size - 1 - int(np.argmax(rates.ravel()[::-1] == top))  # of the best, as a scan keeps with >=
        r, w, k = np.unravel_index(last, rates.shape)
        best = {candidates[i].request_id: int(t.widths[w, i]) for i in order[r, w, : k + 1]}
        best_w, best_r, best_rows, best_rate, waits = w + 1, int(r), math.ceil(rows[r, w, k]), top, mode
    informed = informed and (known or not best)  # a draft never measured: again once it is
    return WidthPlan({c.request_id: best.get(c.request_id, 0) for c in candidates}, best_w, step, informed,
                     best_rows, best_r, waits)


class _Table:
    """The candidates as arrays, for every refill depth r (0..R), width w (1..W) and number k of speculating
    requests (the k that gain most, 1..n) at once: plan() prices all its plans in one go (numpy), so that a plan
    over hundreds of requests costs a few milliseconds, not a hundred, on the step's shadow."""

    def __init__(self, candidates: list[Candidate], stages: int):
        n, top = len(candidates), max(c.max_width for c in candidates)
        self.stages = stages
        self.max_refill = np.array([c.max_refill for c in candidates])  # [n]
        self.widths = np.minimum(np.arange(1, top + 1)[:, None], [c.max_width for c in candidates])  # [W, n]
        self.alphas = np.array([[c.alphas[x - 1] if x else 0.0 for c, x in zip(candidates, row)]
                                for row in self.widths.tolist()]).reshape(top, n)  # [W, n] P(accept) at that width
        self.base = sum(1 / stages for _ in candidates)  # tokens per step with nobody speculating, summed as a scan
        self.roots = np.ceil((n - np.arange(n + 1)) / stages)  # [n + 1] rows of the n - k requests sending roots


def _tokens(alphas: np.ndarray, widths: np.ndarray, stages: int, refill, pace=1.0) -> np.ndarray:
    """tokens_per_step of each request at its width, broadcast over refill depth and pace; a request at width 0
    yields its root's 1 / stages."""
    a = np.clip(alphas, 0.0, MAX_ALPHA)
    tail = a ** (refill + 1) / (1 - a)
    return np.where(widths > 0, ((1 - a ** (refill + 1)) / (1 - a) + tail) / (stages + pace * tail), 1 / stages)


def _misses(alphas: np.ndarray, widths: np.ndarray, stages: int, refill) -> np.ndarray:
    """Misses per step of each request speculating (one per cycle of N + streamed steps); none at width 0."""
    a = np.minimum(alphas, MAX_ALPHA)
    return np.where(widths > 0, 1 / (stages + a ** (refill + 1) / (1 - a)), 0.0)


def _waiting(t: _Table, costs: StepCosts, draft_costs: StepCosts, refill_costs: StepCosts):
    """(tokens per second, rows per step, the requests by gain) of every plan [R + 1, W, n] (along the last axis,
    the k requests that gain most speculate) where the pipe waits for the draft: a step costs the pipe's and the
    draft's forward over the drafted nodes, whichever is longer, plus the refill's drafting when a speculating
    request misses in it."""
    refill = np.minimum(np.arange(int(t.max_refill.max()) + 1)[:, None, None], t.max_refill)  # [R + 1, 1, n]
    gains = _tokens(t.alphas, t.widths, t.stages, refill) - 1 / t.stages  # [R + 1, W, n] (exactly 0 at width 0)
    order = _ranked(gains)
    tokens = _running(np.take_along_axis(gains, order, -1), t.base)
    drafted = np.cumsum(np.take_along_axis(np.broadcast_to(t.widths, gains.shape), order, -1), axis=-1)
    misses = np.take_along_axis(np.broadcast_to(_misses(t.alphas, t.widths, t.stages, refill), gains.shape), order, -1)
    no_miss = np.cumprod(1 - misses, axis=-1)
    rows = drafted + t.roots[1:]
    extra = np.array([refill_costs(r) if r else 0.0 for r in range(refill.shape[0])])[:, None, None]
    seconds = np.maximum(costs.many(rows), draft_costs.many(drafted)) + (1 - no_miss) * extra
    return tokens / seconds, rows, order


def _beside(t: _Table, costs: StepCosts, draft_costs: StepCosts):
    """(tokens per second, rows per step, the requests by gain) of every plan [1, W, n] where the draft runs beside
    the pipe unwaited: the pipe steps at its own pace, and a draft forward over the drafted frontier nodes that is
    slower than a step sends each speculating request's next level only every `pace` steps (its rows spread over
    them). The pace depends on k, so the k requests' tokens are summed at each k's own pace ([n, n] per width)."""
    n = t.widths.shape[1]
    order = _ranked(_tokens(t.alphas, t.widths, t.stages, 0) - 1 / t.stages)  # [W, n] ranked at pace 1
    drafted = np.cumsum(np.take_along_axis(t.widths, order, -1), axis=-1).astype(float)  # [W, n]
    rows = drafted + t.roots[1:]
    for _ in range(2):  # the step's cost and the pace depend on each other: two rounds settle it
        pace = np.maximum(1.0, draft_costs.many(drafted) / np.maximum(costs.many(rows), 1e-9))
        rows = drafted / pace + t.roots[1:]
    seconds = costs.many(rows)
    k = np.arange(1, n + 1)
    rates = np.empty(drafted.shape)
    for w in range(drafted.shape[0]):
        ranked = order[w]
        at_pace = _tokens(t.alphas[w, ranked], t.widths[w, ranked], t.stages, 0, pace[w][:, None])  # [k, j]: the
        # j-th ranked request's tokens at the pace of k speculating
        taken = np.cumsum(np.where(k[None, :] <= k[:, None], at_pace, 0.0), axis=-1)[:, -1]  # the k first
        rates[w] = (t.base - k / t.stages + taken) / seconds[w]
    return rates[None], rows[None], order[None]


def _ranked(gains: np.ndarray) -> np.ndarray:
    """The requests by gain along the last axis, most first (ties: the candidates' order, as a stable sort)."""
    return np.argsort(-gains, axis=-1, kind="stable")


def _running(values: np.ndarray, start: float) -> np.ndarray:
    """start + values[..., 0] + values[..., 1] + ..., summed left to right as a scan would (cumsum)."""
    head = np.full((*values.shape[:-1], 1), start)
    return np.cumsum(np.concatenate([head, values], axis=-1), axis=-1)[..., 1:]
