"""SpecPipe-DB's width plan (scheduler/width.py): acceptance, the tokens-per-step model, step costs, the plan,
and the scheduler narrowing under load while staying lossless."""

from __future__ import annotations

import pytest

from scheduler.mode_check import Mode, ModeCheck
from scheduler.scheduler import Phase, Scheduler, StepResult, _Scheduled
from scheduler.width import MAX_ALPHA, Acceptance, Candidate, StepCosts, plan, tokens_per_step
from shared.types.config import EngineConfig, PolicyConfig
from shared.types.errors import ConfigError
from tests.scheduler.test_scheduler_state import FakeDraft, FakePipeline, Request, reference_decode

pytestmark = pytest.mark.unit

TOKENS_PER_STEP = {
    # label: (alpha, stages, refill, expected)
    "no acceptance is plain PP: one token per N steps": (0.0, 8, 3, 1 / 8),
    "one stage, no acceptance: a token a step": (0.0, 1, 0, 1.0),
    "alpha 0.5, 4 stages, no refill": (0.5, 4, 0, (1 + 1.0) / (4 + 1.0)),
    "alpha 0.5, 4 stages, refill 2: the refill's levels add tokens": (0.5, 4, 2, (1.75 + 0.25) / (4 + 0.25)),
    "alpha 0.5, 4 stages, a level every 3 steps (a draft beside the pipe)": (0.5, 4, 0, (1 + 1.0) / (4 + 3 * 1.0), 3),
}


@pytest.mark.parametrize("case", list(TOKENS_PER_STEP))
def test_tokens_per_step(case) -> None:
    alpha, stages, refill, expected, *pace = TOKENS_PER_STEP[case]
    assert tokens_per_step(alpha, stages, refill, *pace) == pytest.approx(expected)


def test_tokens_per_step_grows_with_acceptance() -> None:
    rates = [tokens_per_step(a / 10, 8, 3) for a in range(10)]
    assert rates == sorted(rates) and rates[-1] < 1.0


def test_acceptance_counts_a_rank_only_where_it_was_sent() -> None:
    acc = Acceptance()
    for _ in range(10):
        acc.record(sent=1, rank=0)  # width 1: always the best child
    for _ in range(10):
        acc.record(sent=2, rank=None)  # width 2: missed both
    for _ in range(10):
        acc.record(sent=2, rank=1)  # width 2: the second best
    # rank 0: 10 hits in 30 levels; rank 1: 10 in the 20 levels that sent it
    alphas = acc.alphas(8, Acceptance().rank_rates())  # no pooled data: the prior alone
    assert alphas[0] == pytest.approx((10 + 4 * 0.5) / (30 + 4))
    assert alphas[1] == pytest.approx((10 + 2) / 34 + (10 + 4 * 0.25) / 24)
    # a rank never sent adds its optimistic prior, half the rank above's (1/8 for rank 2); capped below 1
    assert alphas[2] == pytest.approx(alphas[1] + 0.125)
    assert alphas[7] == MAX_ALPHA


def test_acceptance_is_by_rank_in_the_level_not_under_the_frontier() -> None:
    """A level's width buys nodes under the frontier's siblings too: levels [F, G] then [G1, F1, G2] (by score);
    the target takes F, then F1, the second best of a level of 3, though F1 was F's only sent child."""
    sched = Scheduler(PolicyConfig("specpipe", stages=4, width=3), EngineConfig(), context_limit=1_000)
    state = sched.add_request(Request("r", (1, 2, 3), max_new_tokens=8))
    tree = state.tree
    root = tree.add_accepted(10, -1, 3).node_id
    state.phase, state.frontier = Phase.DECODE, root
    f, g = tree.add_proposals(root, [(20, -0.1), (21, -0.2)])
    (f1,), (g1, g2) = tree.add_proposals(f, [(30, -0.4)]), tree.add_proposals(g, [(31, -0.1), (32, -0.5)])
    sched._send(state, [f, g])
    sched._send(state, tree.best_children([f, g], 3))
    assert [tree[n].rank for n in (g1, f1, g2)] == [0, 1, 2]
    sched._verify(state, {root: 20, f: 30}, StepResult(), {})
    assert state.frontier == f1 and state.output == [20, 30]
    acc = state.stats.acceptance
    assert acc.tried[:4] == [2, 2, 1, 0] and acc.hits[:3] == [1, 1, 0]


STEP_COSTS = {
    # label: (observations, rows asked, expected seconds)
    "nothing known: 1": ([], 16, 1.0),
    "a measured point": ([(8, 0.2)], 8, 0.2),
    "one bucket known: proportional, narrower": ([(8, 0.2)], 2, 0.05),
    "one bucket known: flat, wider": ([(8, 0.2)], 64, 0.2),
    "between known buckets: interpolated": ([(2, 0.1), (32, 0.5)], 8, 0.18),
    "beyond them: the fitted line": ([(2, 0.1), (32, 0.5)], 62, 0.9),
    "below them: the fitted line": ([(2, 0.1), (32, 0.5)], 1, 0.1 - 0.4 / 30),
    "a line never falls with rows": ([(2, 0.5), (32, 0.1)], 64, 0.3),
    "moving average": ([(4, 1.0), (4, 0.0)], 4, 0.75),
    "flat below (a forward's fixed cost): narrower as dear": ([(8, 0.2), (16, 0.3)], 2, 0.2),
    # one slow step at 3 rows (a new shape's first kernels) between trusted buckets: priced as they predict, and
    # not out of every plan; seen TRUSTED times, its own average
    "seen once, between trusted buckets: no dearer than they predict": (
        [(1, 0.02)] * 3 + [(64, 0.14)] * 3 + [(3, 0.045)], 3, 0.02 + 0.12 * 2 / 63),
    "seen three times: its own average": ([(1, 0.02)] * 3 + [(64, 0.14)] * 3 + [(3, 0.045)] * 3, 3, 0.045),
    "seen once, beyond the trusted ones: its own (no evidence against it)": ([(1, 0.02)] * 3 + [(4, 0.05)], 4, 0.05),
    "seen three times long ago: no dearer than the trusted ones predict": (
        [(3, 0.045)] * 3 + [(1, 0.02), (64, 0.14)] * 64, 3, 0.02 + 0.12 * 2 / 63),
}


@pytest.mark.parametrize("case", list(STEP_COSTS))
def test_step_costs(case) -> None:
    observations, rows, expected = STEP_COSTS[case]
    costs = StepCosts(flat_below=case.startswith("flat below"))
    for n, s in observations:
        costs.observe(n, s)
    assert costs(rows) == pytest.approx(expected)


def _candidates(alphas: list[float], width: int = 4, stages: int = 8) -> list[Candidate]:
    """Acceptance `a` at width 1, growing by 0.05 per extra node."""
    return [Candidate(f"r{i}", width, tuple(a + 0.05 * (w - 1) if a else 0.0 for w in range(1, width + 1)), 3)
            for i, a in enumerate(alphas)]


def _costs(per_row: float, fixed: float = 1.0) -> StepCosts:
    costs = StepCosts()
    for rows in (1, 2, 4, 8, 16, 32, 64, 128):
        costs.observe(rows, fixed + per_row * rows)
    return costs


PLANS = {
    # label: (acceptance per request, per-row cost, expected widths)
    "free rows: everyone at full width": ([0.3, 0.3], 0.0, {"r0": 4, "r1": 4}),
    "nothing measured yet: full width (the old rule)": ([0.3, 0.3], None, {"r0": 4, "r1": 4}),
    "rows dear, many requests: PP (width 0)": ([0.2] * 16, 1.0, {f"r{i}": 0 for i in range(16)}),
    "the request that accepts speculates, the other does not": ([0.3, 0.0], 0.02, {"r0": 4, "r1": 0}),
    "moderate cost: a narrower tree": ([0.3], 0.2, {"r0": 1}),
}


@pytest.mark.parametrize("case", list(PLANS))
def test_plan(case) -> None:
    alphas, per_row, expected = PLANS[case]
    costs = StepCosts() if per_row is None else _costs(per_row)
    assert plan(_candidates(alphas), costs, 8).widths == expected


DRAFTS = {
    # label: (a draft forward's seconds over 1..64 nodes, or None: never measured; requests; expected widths)
    "never measured: assumed to keep up, everyone speculates": (None, 2, {"r0": 4, "r1": 4}),
    "as fast as a step (a GPU's small draft): everyone speculates": (1.0, 2, {"r0": 4, "r1": 4}),
    "3 steps, 2 requests: the tokens still pay for the forward": (3.0, 2, {"r0": 4, "r1": 4}),
    "4 steps, 8 requests: PP drafts nothing and is faster": (4.0, 8, {f"r{i}": 0 for i in range(8)}),
}


@pytest.mark.parametrize("case", list(DRAFTS))
def test_plan_prices_the_draft_forward_at_every_width(case) -> None:
    """Steps cost 1 s at any rows; a speculating plan's step lasts at least one draft forward, whatever its width:
    a draft measured at one width prices every plan, and PP is never charged one."""
    seconds, requests, expected = DRAFTS[case]
    draft = StepCosts.draft()
    if seconds is not None:
        draft.observe(64, seconds)
    made = plan(_candidates([0.6] * requests), _costs(0.0), 8, draft_costs=draft)
    assert made.widths == expected
    assert made.informed == (seconds is not None or not any(expected.values()))


BESIDE = {
    # label: (a draft forward's seconds over 64 nodes, requests, expected width of each)
    "4 steps, 8 requests: a level every 4 steps still beats PP's roots": (4.0, 8, 4),
    "40 steps, 8 requests: a level so seldom that PP is faster": (40.0, 8, 0),
    "never measured: assumed to keep up": (None, 2, 4),
}


@pytest.mark.parametrize("case", list(BESIDE))
def test_plan_prices_the_pace_of_a_draft_beside_the_pipe(case) -> None:
    """The pipe never waits for the draft (draft_waits=False): a step costs the pipe's 1 s whatever the draft's
    forward, which sets how often a level enters instead; a refill is the bonus token alone."""
    seconds, requests, expected = BESIDE[case]
    draft = StepCosts.draft()
    if seconds is not None:
        draft.observe(64, seconds)
    made = plan(_candidates([0.6] * requests), _costs(0.0), 8, draft_costs=draft, draft_waits=False)
    assert made.widths == {f"r{i}": expected for i in range(requests)}
    assert made.refill == 0
    waited = plan(_candidates([0.6] * requests), _costs(0.0), 8, draft_costs=draft)
    assert seconds is None or not any(waited.widths.values())  # had the pipe waited, PP would be faster


AUTO = {
    # label: (a draft forward's seconds over 64 nodes, requests, the plan waits for the draft, expected width of each)
    "as fast as a step: waited for (its refills carry drafted levels)": (1.0, 2, True, 4),
    "4 steps, 8 requests: beside the pipe, where waiting would make it PP": (4.0, 8, False, 4),
    "never measured: beside the pipe until it is (trying it there stalls nothing)": (None, 2, False, 4),
    "40 steps, 8 requests: PP either way, and PP waits for nothing": (40.0, 8, True, 0),
}


@pytest.mark.parametrize("case", list(AUTO))
def test_plan_chooses_whether_the_pipe_waits_for_the_draft(case) -> None:
    """draft_waits=None: the plan prices both and keeps the better (waiting on a tie), and says which."""
    seconds, requests, waits, width = AUTO[case]
    draft = StepCosts.draft()
    if seconds is not None:
        draft.observe(64, seconds)
    candidates = _candidates([0.6] * requests)
    made = plan(candidates, _costs(0.0), 8, draft_costs=draft, draft_waits=None)
    assert made.waits == waits and made.widths == {f"r{i}": width for i in range(requests)}
    same = plan(candidates, _costs(0.0), 8, draft_costs=draft, draft_waits=waits)
    assert (made.widths, made.refill, made.rows) == (same.widths, same.refill, same.rows)


REFILLS = {
    # label: (extra seconds of a refill of 3 levels, or None: never measured; expected refill depth)
    "refill drafting never measured: the deepest (the old rule)": (None, 3),
    "refill drafting free (a GPU's draft): the deepest": (0.0, 3),
    "refill drafting dear (a draft slower than a step): the bonus token alone": (30.0, 0),
}


@pytest.mark.parametrize("case", list(REFILLS))
def test_plan_chooses_the_refill_depth(case) -> None:
    extra, expected = REFILLS[case]
    refill_costs = StepCosts(unknown=0.0)
    if extra is not None:
        refill_costs.observe(3, extra)
    made = plan(_candidates([0.5, 0.5]), _costs(0.0), 8, refill_costs=refill_costs)
    assert made.refill == expected
    assert made.widths == {"r0": 4, "r1": 4}  # acceptance is worth its rows: they still speculate


def test_plan_keeps_a_request_below_its_own_max_width() -> None:
    cands = [Candidate("narrow", 1, (0.3,), 3), Candidate("wide", 4, (0.3, 0.35, 0.4, 0.45), 3)]
    made = plan(cands, StepCosts(), 8)
    assert made.widths == {"narrow": 1, "wide": 4}
    assert made.width_of("new since") == 4  # a request decoding since the plan gets its peers' width


def test_width_rule_is_validated() -> None:
    with pytest.raises(ConfigError, match="width rule"):
        PolicyConfig("specpipe", width_rule="fixed")


def _run(policy_name: str, width_rule: str, requests: int, row_cost: float, n: int = 24, draft_cost: float = 0.0,
         accuracy: float = 0.3, refill: int = 2) -> tuple[FakePipeline, float]:
    """Serve `requests` of `n` tokens at once, twice (a long-lived scheduler has learnt its costs by the second
    time); the modeled seconds of the second (step cost 1 + row_cost per row, or its drafting if longer)."""
    policy = PolicyConfig(policy_name, stages=4, width=4, refill_depth=refill, width_rule=width_rule)
    spent = []
    pipe = FakePipeline(policy, EngineConfig(prefill_chunk=8, max_new_tokens=n), FakeDraft(accuracy=accuracy, seed=1),
                        step_cost=lambda rows: 1.0 + row_cost * rows, draft_cost=draft_cost)
    observe = pipe.sched.observe_step
    pipe.sched.observe_step = lambda seconds, wait: spent.append(seconds) or observe(seconds, wait)
    for round_ in ("a", "b"):
        spent.clear()
        pipe.run([(0, Request(f"{round_}{i}", (i + 1, 2, 3), max_new_tokens=n)) for i in range(requests)])
    for rid, request in pipe.requests.items():
        assert pipe.sched.requests[rid].output == reference_decode(request.prompt, n)
    return pipe, sum(spent)


RUNS = {"pp": ("pp", "cost"), "specpipe, budget rule": ("specpipe", "budget"), "specpipe, cost rule": ("specpipe", "cost")}


def test_cost_rule_never_falls_below_pp_under_saturation() -> None:
    """16 requests, a draft mostly wrong, rows dear: the budget rule's speculation makes the run far slower than
    plain PP; the cost rule has learnt it and stays near PP's time, losslessly."""
    seconds = {label: _run(*RUNS[label], 16, 1.0)[1] for label in RUNS}
    assert seconds["specpipe, budget rule"] > 1.5 * seconds["pp"], seconds
    assert seconds["specpipe, cost rule"] < 1.1 * seconds["pp"], seconds


def test_cost_rule_keeps_speculating_when_rows_are_free(monkeypatch) -> None:
    """One request, rows free (a GPU's step): the plan stays at full width, as the budget rule, and beats PP (the
    mode check's probe of plain decoding aside: test_the_mode_check_costs_little_where_speculation_pays)."""
    monkeypatch.setattr(ModeCheck, "choose", lambda self, decoding, step: Mode.SPEC)
    runs = {label: _run(*RUNS[label], 1, 0.0) for label in RUNS}
    sent = {label: pipe.sched.requests["b0"].stats.sent_speculative for label, (pipe, _) in runs.items()}
    assert sent["specpipe, cost rule"] == sent["specpipe, budget rule"] > 0
    assert runs["specpipe, cost rule"][1] < runs["pp"][1]


def test_the_mode_check_keeps_one_request_near_pp_where_the_plan_cannot_price_its_refills(monkeypatch) -> None:
    """One request, rows dear (a CPU's few-row steps), a draft mostly wrong: each miss's refill carries 3 rows that
    the plan's rows leave out, so the plan speculates and the run takes over 1.3x PP's time. The mode check
    measures plain decoding faster and keeps the run within 1.1x of PP's, losslessly (_run checks the tokens)."""
    args = {"n": 200, "accuracy": 0.1}
    pp = _run(*RUNS["pp"], 1, 2.0, **args)[1]
    checked = _run(*RUNS["specpipe, cost rule"], 1, 2.0, **args)[1]
    monkeypatch.setattr(ModeCheck, "choose", lambda self, decoding, step: Mode.SPEC)
    unchecked = _run(*RUNS["specpipe, cost rule"], 1, 2.0, **args)[1]
    assert unchecked > 1.3 * pp and checked < 1.1 * pp, (pp, checked, unchecked)


def test_each_request_decoding_alone_is_measured_as_itself(monkeypatch) -> None:
    """Requests one after another, each alone: the mode check is told of each new lone request, once, so one
    request's acceptance never decides the next one's mode (ModeCheck.new_lone_request)."""
    told = []
    monkeypatch.setattr(ModeCheck, "new_lone_request", lambda self: told.append(pipe.sched.step))
    pipe = FakePipeline(PolicyConfig("specpipe", stages=4, width=4, width_rule="cost"),
                        EngineConfig(prefill_chunk=8, max_new_tokens=40), FakeDraft(accuracy=0.5, seed=1),
                        step_cost=lambda rows: 1.0 + rows)
    for i in range(3):
        pipe.run([(pipe.sched.step, Request(f"r{i}", (i + 1, 2, 3), max_new_tokens=40))])
    assert len(told) == 3 and told == sorted(told)


def test_the_mode_check_costs_little_where_speculation_pays(monkeypatch) -> None:
    """One request, rows free, a draft mostly right: plain decoding, probed once, is far slower, so it is not
    probed again within the run, which takes no longer than unchecked."""
    pipe, checked = _run(*RUNS["specpipe, cost rule"], 1, 0.0, n=200, accuracy=0.9)
    rates = pipe.sched.mode_check.snapshot()
    assert rates["plain@1"] * 2 < rates["spec@1"], rates
    monkeypatch.setattr(ModeCheck, "choose", lambda self, decoding, step: Mode.SPEC)
    assert checked <= _run(*RUNS["specpipe, cost rule"], 1, 0.0, n=200, accuracy=0.9)[1]


def test_cost_rule_shortens_refills_when_the_draft_paces_the_pipe() -> None:
    """Two requests, a draft forward 1.5x a step (a CPU's large draft): a refill of 3 levels waits for 3 sequential
    forwards. The cost rule learns that wait and refills with fewer levels, faster than the budget rule, losslessly."""
    runs = {label: _run(*RUNS[label], 2, 0.0, n=40, draft_cost=1.5, accuracy=0.6, refill=3) for label in RUNS}
    assert runs["specpipe, cost rule"][0].sched._plan.refill < 3
    assert runs["specpipe, cost rule"][1] < 0.9 * runs["specpipe, budget rule"][1], runs


def test_cost_rule_never_falls_below_pp_when_the_draft_paces_the_pipe() -> None:
    """Eight requests on 4 stages, a draft forward 1.5x a step and a draft mostly wrong: every drafted step costs the
    draft's time, where PP drafts nothing. The plan learns that from the steps nothing was drafted for (prefill) and
    sends roots only, as PP, where the budget rule's speculation takes over twice PP's time."""
    runs = {label: _run(*RUNS[label], 8, 0.0, n=40, draft_cost=1.5, accuracy=0.3, refill=3)[1] for label in RUNS}
    assert runs["specpipe, budget rule"] > 2 * runs["pp"], runs
    assert runs["specpipe, cost rule"] <= 1.02 * runs["pp"], runs


def test_a_waited_step_far_dearer_than_priced_is_planned_again_at_once() -> None:
    """A waited level that queued behind the draft's other work (new prompts) took 5 times what its forward and the
    pipe cost: the plan is made again at the next step, not 2 x stages steps later, and it prices waiting at what
    the step took, kept apart from the draft's own forward (which still prices it beside the pipe)."""
    sched = Scheduler(PolicyConfig("specpipe", stages=4, width=2, draft_waits=None), EngineConfig(), 4096)
    sched.costs.observe(2, 1.0)
    sched.observe_draft(2, 1.0)  # the draft's forward over 2 nodes: as long as a step
    sched._plan = plan([], sched.costs, 4, step=0)
    assert not sched._plan_due(1)
    sched._scheduled.append(_Scheduled(0, drafted=2, waited=True, rows=2))  # a step of a waiting plan, 2 nodes drafted
    sched.observe_step(5.0, 4.0)
    assert sched._plan_due(1)
    assert sched.wait_costs(2) == pytest.approx(5.0) and sched.draft_costs(2) == pytest.approx(1.0)
    sched.plan_ahead()
    assert not sched._plan_due(2)


def test_a_step_observed_after_the_next_was_scheduled_is_priced_by_its_own_batches() -> None:
    """Under async scheduling the services observe step t after scheduling t + 1: its seconds go under the rows
    of the batches in the pipe at step t (the last `stages` up to t), not under t + 1's."""
    sched = Scheduler(PolicyConfig("specpipe", stages=2, width=2, async_scheduling=True), EngineConfig(), 4096)
    sched._scheduled.extend([_Scheduled(1, 0, False, rows=4), _Scheduled(2, 0, False, rows=4),
                             _Scheduled(3, 0, False, rows=16)])
    sched.step = 3
    sched.observe_step(0.5, step=2)
    assert [rows for rows, _ in sched.costs.points.values()] == [4]
    sched.observe_step(0.9)  # the last scheduled: steps 2 and 3 in the pipe
    assert sorted(rows for rows, _ in sched.costs.points.values()) == [4, 16]
