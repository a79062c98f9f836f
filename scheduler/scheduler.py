"""The scheduler: a pure state machine over requests and their token trees.

    add_request(req)            a new request (prompt ids, sampling, limits)
    expansion_jobs()            tree nodes whose draft children are wanted now
    add_proposals(...)          draft children for a node (possibly none)
    schedule()                  one pipeline step: the micro-batch for stage 0
    update_from_output(out)     verify what left the last stage -> events, tokens

No transport here: the in-process executor and the distributed services both
drive this class. The three policies are one mechanism with three settings
(see PolicyConfig): pp sends only the accepted root; tree sends the root with
a drafted tree and waits for it; specpipe streams one level per step, up to
`stages` micro-batches of a request in the pipe, and refills after a miss.

Verification (per request, in the order rows left the pipe): the frontier is
the last accepted node, whose target token is awaited. Its target t is always
a correct new token. If a sent child of the frontier has token t, it is
accepted (its siblings' subtrees are pruned) and becomes the frontier; else t
is a bonus token: everything speculative is pruned and the pipe is refilled
from t.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from scheduler.mode_check import Mode, ModeCheck
from scheduler.tree import Status, TokenTree
from scheduler.width import Acceptance, Candidate, StepCosts, WidthPlan, plan
from shared.types.batch import ROOT_PARENT, MicroBatch, PipelineEvent, Row, TargetTokens, TokenLogprob
from shared.types.config import EngineConfig, PolicyConfig, SamplingParams
from shared.types.errors import RequestError
from shared.types.speculation import ExpansionJob, NodeRef


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 128
    stop_ids: frozenset[int] = frozenset()
    policy: PolicyConfig | None = None  # per-request override of the scheduler's policy


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


DEPTH_BINS = 16  # accepted tokens are counted by depth 0..15 below the last bonus token (15 = 15 or deeper)
MIN_PREFILL_ROWS = 16  # a prompt is split over the stages only into chunks of at least this many rows
PACED = 0.05  # a step whose draft wait was more than this share of it was paced by the draft (the rest: receiving)
STALLED = 2.0  # a waited step this many times longer than its plan priced it: the plan is made again at once


@dataclass
class RequestStats:
    first_decode_step: int | None = None
    last_token_step: int | None = None
    accepted: int = 0  # drafted tokens that matched the target
    bonus: int = 0  # target tokens with no matching child (includes the first token)
    sent_speculative: int = 0  # drafted nodes sent into the pipe
    pruned: int = 0  # nodes dropped after being sent or drafted
    drafts: int = 0  # speculative levels sent (vLLM's "drafts": one proposal of one or more tokens)
    accepted_per_depth: list[int] = field(default_factory=lambda: [0] * DEPTH_BINS)
    run: int = 0  # accepted tokens since the last bonus token: the depth of the next accepted one
    acceptance: Acceptance = field(default_factory=Acceptance)  # by rank of the sent child: the width plan's input

    COUNTS = ("accepted", "bonus", "sent_speculative", "pruned", "drafts")

    def add(self, other: RequestStats) -> None:
        """Accumulate another request's counts (the scheduler's totals over finished requests)."""
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.accepted_per_depth = [a + b for a, b in zip(self.accepted_per_depth, other.accepted_per_depth)]

    @property
    def steps(self) -> int:
        if self.first_decode_step is None or self.last_token_step is None:
            return 0
        return self.last_token_step - self.first_decode_step + 1


@dataclass
class RequestState:
    request: Request
    tree: TokenTree = field(default_factory=TokenTree)
    phase: Phase = Phase.PREFILL
    prefill_sent: int = 0
    frontier: int | None = None  # accepted node whose target token is awaited
    needs_refill: bool = False  # the frontier's row has not been sent yet
    levels: list[list[int]] = field(default_factory=list)  # sent levels still in the tree, oldest first
    level_sizes: dict[int, int] = field(default_factory=dict)  # position -> nodes of the level last sent there
    inflight: int = 0  # micro-batches of this request in the pipe
    expanding: set[int] = field(default_factory=set)  # nodes with an expansion job out
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token when the request asked
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def text(self) -> list[int]:
        return list(self.request.prompt) + self.output


@dataclass
class _Scheduled:
    """A batch as observe_step prices the step that computed it."""

    step: int
    drafted: int  # the most nodes one round of drafting before it asked: the draft's cost key (0: none)
    waited: bool  # whether the pipe waited for that drafting
    rows: int = 0  # its cost key: the plan's rows per step, or its prompt chunk's rows if larger
    refill: int = 0  # drafted levels of the deepest refill it carried
    prefill: bool = False  # it carried prompt rows: a step it is in measures neither mode


@dataclass
class StepResult:
    events: list[PipelineEvent] = field(default_factory=list)
    new_tokens: dict[str, list[int]] = field(default_factory=dict)
    new_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # aligned with new_tokens, if asked
    finished: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, policy: PolicyConfig, engine: EngineConfig, context_limit: int):
        self.policy = policy
        self.engine = engine
        self.context_limit = context_limit
        self.requests: dict[str, RequestState] = {}
        self.step = 0
        self._next_batch = 0
        self._batch_members: dict[int, set[str]] = {}
        self.retired = RequestStats()  # counts of the requests that have left
        self.costs = StepCosts()  # the pipe's seconds per step (the draft's wait left out) by rows (observe_step)
        self.draft_costs = StepCosts.draft()  # a draft forward's own seconds, by frontier nodes expanded
        # a waited level's drafting as long as the steps it paced took: its forward, and any queue behind the draft's
        # other work (prompts); kept apart, so that a draft found slow to wait for is not waited for again
        self.wait_costs = StepCosts.draft()
        self.refill_costs = StepCosts(unknown=0.0)  # extra seconds of a step whose batch carried a refill, by levels
        self._drafting = 0  # the most nodes one round of expansion jobs asked since the last schedule()
        self._draft_kept_up = False  # a waited step's drafting did not pace it: the draft keeps up (a lookup)
        self._stalled = False  # a waited step took far longer than priced (the draft's queue): plan again now
        self.acceptance = Acceptance()  # pooled over every request so far: the prior of each one's estimate
        self.mode_check = ModeCheck()  # measured tokens per second with and without speculation (mode_check.py)
        self._verified_tokens = 0  # tokens the verifications since the last observed step emitted
        self._mode_since = (Mode.PLAIN, 0)  # the mode of the batches scheduled, and the step it began at
        self._lone: str | None = None  # the last request seen decoding alone (the mode check measures it as itself)
        self._plan: WidthPlan | None = None  # the cost rule's widths, made again every 2 x `stages` steps
        # what observe_step needs of the last `round_trip` batches scheduled (those a step it observes computed)
        self._scheduled: deque[_Scheduled] = deque(maxlen=max(policy.round_trip, 1))

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> RequestState:
        if request.request_id in self.requests:
            raise RequestError(f"duplicate request id '{request.request_id}'")
        self.check(request)
        state = RequestState(request)
        self.requests[request.request_id] = state
        return state

    def check(self, request: Request) -> None:
        """Raise RequestError if the request cannot be served."""
        if not request.prompt:
            raise RequestError("empty prompt")
        if request.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be >= 1")
        needed = len(request.prompt) + request.max_new_tokens
        if needed > self.context_limit:
            raise RequestError(
                f"prompt of {len(request.prompt)} tokens plus {request.max_new_tokens} new tokens "
                f"exceeds the model's context of {self.context_limit}"
            )

    def policy_of(self, request: Request) -> PolicyConfig:
        return request.policy or self.policy

    def kv_capacity(self, request: Request) -> int:
        """KV slots a stage reserves: prompt, output, and the most speculative nodes in flight."""
        p = self.policy_of(request)
        levels = p.refill_levels + (p.round_trip + 1 if p.streams_levels else 0)  # +1: the level drafted ahead
        return len(request.prompt) + request.max_new_tokens + 1 + levels * max(p.width, 1)

    def totals(self) -> RequestStats:
        """Speculation counts over every request so far, finished or not (for metrics)."""
        total = RequestStats()
        total.add(self.retired)
        for state in self.active():
            total.add(state.stats)
        return total

    def observe_step(self, seconds: float, draft_wait: float = 0.0, step: int | None = None) -> None:
        """The driver's measured duration of `step` (None: the last scheduled; under async scheduling the
        services observe a step after scheduling the next), and how much of it the stages spent waiting for the
        draft. The width plan learns from it (scheduler/width.py):
          - the pipe's cost, the step without the wait, keyed by the rows per step of the plan in force: the pipe
            holds the batches of the last `stages` steps, maybe of two plans, so the step is the larger one's;
          - where the draft paced the step (it waited), the waited drafting of the plan's drafted nodes, as long
            as the whole step; where it kept up and is believed dearer, the step as a bound;
          - where the batch carried a refill of r drafted levels, what the step took beyond the two as the cost
            of a refill of r levels;
          - for the mode check (mode_check.py), the step's seconds and the tokens its verification emitted, under
            the mode in force (speculating or not) from 2 x stages steps after a switch, no prompt rows in the pipe."""
        step = self.step if step is None else step
        batch = next((b for b in self._scheduled if b.step == step), None)
        in_pipe = [b for b in self._scheduled if step - self.policy.stages < b.step <= step]
        tokens, self._verified_tokens = self._verified_tokens, 0
        if batch is None or not any(b.rows for b in in_pipe):
            return
        mode, since = self._mode_since
        if step - since >= 2 * self.policy.stages and not any(b.prefill for b in in_pipe):  # past the transition
            self._note_lone_request()
            self.mode_check.observe(mode, self._decoding(), step, tokens, seconds)
        key, drafted, refill_sent = max(b.rows for b in in_pipe), batch.drafted, batch.refill
        self.costs.observe(key, seconds - draft_wait)
        if not drafted or not batch.waited:  # unwaited, the draft reports its forwards (observe_draft)
            return
        expected = self._drafted_step(key, drafted)  # as the plan priced it, a refill aside
        refill = self.refill_costs(refill_sent) if refill_sent else 0.0
        self._stalled = self._stalled or seconds > STALLED * (expected + refill)
        if refill_sent:
            self.refill_costs.observe(refill_sent, max(seconds - expected, 0.0))
        elif draft_wait > PACED * seconds or self._waited_draft()(drafted) > seconds:
            self.wait_costs.observe(drafted, seconds)
        else:
            self._draft_kept_up = True

    def observe_draft(self, nodes: int, seconds: float) -> None:
        """One draft forward over `nodes` frontier nodes, timed where it ran (its own time, not its queue): the
        width plan's draft pace beside the pipe, and its guess of a waited level until one is measured."""
        self.draft_costs.observe(nodes, seconds)

    def waits_for_draft(self) -> bool:
        """Whether the pipe waits for the draft's levels now: the policy's choice, or where it leaves it to the
        width plan (PolicyConfig.draft_waits=None), the plan in force (waiting until one is made)."""
        if self.policy.draft_waits is not None:
            return self.policy.draft_waits
        return self._plan.waits if self._plan is not None else True

    def draft_known(self) -> bool:
        """Whether the draft's pace is known: a forward measured, or a waited step it did not pace (a lookup)."""
        return bool(self.draft_costs.points or self.wait_costs.points) or self._draft_kept_up

    def _waited_draft(self) -> StepCosts:
        """A waited level's drafting: as measured while waiting, else the draft's forwards."""
        return self.wait_costs if self.wait_costs.points else self.draft_costs

    def _drafted_step(self, rows: int, drafted: int) -> float:
        """Expected seconds of a step of `rows` rows while the draft expands `drafted` nodes."""
        return max(self.costs(rows), self._waited_draft()(drafted))

    def active(self) -> list[RequestState]:
        return [s for s in self.requests.values() if s.phase is not Phase.DONE]

    # ---- drafting ------------------------------------------------------------------------------
    def expansion_jobs(self) -> list[ExpansionJob]:
        jobs, decoding = [], self._decoding()
        for state in self.active():
            nodes = [n for n in self._wanted_expansions(state, decoding) if n not in state.expanding]
            if nodes:
                state.expanding.update(nodes)
                refs = [self._ref(state, n) for n in nodes]
                jobs.append(ExpansionJob(state.request.request_id, state.text, refs, self.policy_of(state.request).branch))
        self._drafting = max(self._drafting, sum(len(job.nodes) for job in jobs))
        return jobs

    def add_proposals(self, request_id: str, node_id: int, proposals: list[tuple[int, float]]) -> None:
        state = self.requests.get(request_id)
        if state is None or state.phase is Phase.DONE:
            return
        state.expanding.discard(node_id)
        if node_id in state.tree:  # it may have been pruned meanwhile
            state.tree.add_proposals(node_id, proposals)

    def _wanted_expansions(self, state: RequestState, decoding: int) -> list[int]:
        policy = self.policy_of(state.request)
        if state.phase is not Phase.DECODE or policy.name == "pp":
            return []
        tree = state.tree
        width = self.width_of(state, decoding)
        if width == 0:
            return []
        if state.needs_refill:
            return self._drafted_levels(state, [state.frontier], width)[1]
        if not policy.streams_levels:  # tree/pp send nothing until the round is verified
            return []
        return [n for n in self._deepest_level(state) if not tree[n].expanded]

    def effective_width(self, policy: PolicyConfig | None = None, decoding: int | None = None) -> int:
        """Tree width under load: the step's token budget shared by the decoding requests (`decoding`: their
        number, when the caller has counted them).

        With one request the tree is as wide as configured; as the batch fills,
        width shrinks so a step stays near the budget, down to no speculation.
        """
        decoding = self._decoding() if decoding is None else decoding
        share = self.engine.token_budget // max(decoding, 1) - 1  # one row kept for the request's root
        return max(0, min((policy or self.policy).width, share))

    def width_of(self, state: RequestState, decoding: int) -> int:
        """This request's width now: the budget's share, and under the cost rule the plan's choice."""
        policy = self.policy_of(state.request)
        width = self.effective_width(policy, decoding)
        if not self._uses_plan(state):
            return width
        if self._plan is None or not self._plan.widths:  # none yet, or made while no request decoded
            self._plan = self._make_plan(decoding, self.step)
        return min(width, self._plan.width_of(state.request.request_id))

    def refill_of(self, state: RequestState) -> int:
        """Drafted levels this request's refill carries: its policy's, and under the cost rule the plan's choice."""
        levels = self.policy_of(state.request).refill_levels
        return min(levels, self._plan.refill) if self._plan is not None and self._uses_plan(state) else levels

    def _uses_plan(self, state: RequestState) -> bool:
        policy = self.policy_of(state.request)
        return policy.streams_levels and policy.width_rule == "cost" and state.phase is Phase.DECODE

    def plan_ahead(self) -> None:
        """Make the next step's width plan now if it will be due: the services call this while the stages
        compute, so that schedule() finds it made."""
        if self._plan is None or self._plan_due(self.step + 1):
            self._plan = self._make_plan(self._decoding(), self.step + 1)

    def _plan_due(self, step: int) -> bool:
        """Acceptance and costs have moved on since the plan was made, or it was made blind to cost."""
        period = 2 * self.policy.round_trip  # the pipe is the new plan's alone for the second half
        learnt = bool(self.costs.points) and (self.draft_known() or not self._plan.speculates)
        return step - self._plan.step >= period or (not self._plan.informed and learnt) or self._stalled

    def _make_plan(self, decoding: int, step: int) -> WidthPlan:
        """SpecPipe-DB's widths for the decoding requests under the cost rule (scheduler/width.py)."""
        candidates, prior = [], self.acceptance.rank_rates()
        self._stalled = False
        for state in self.active():
            if not self._uses_plan(state):
                continue
            policy = self.policy_of(state.request)
            top = self.effective_width(policy, decoding)
            alphas = tuple(state.stats.acceptance.alphas(top, prior))
            candidates.append(Candidate(state.request.request_id, top, alphas, policy.refill_levels))
        made = plan(candidates, self.costs, self.policy.round_trip, step, self.draft_costs, self.refill_costs,
                    self.policy.draft_waits, self.draft_known(), self._waited_draft())
        self._note_lone_request()
        if made.informed and made.speculates and self.mode_check.choose(decoding, step) is Mode.PLAIN:
            return made.plain(self.policy.round_trip)  # measured: speculation does not pay here, or a probe
        return made

    @property
    def mode(self) -> Mode:
        """Whether the batches scheduled lately let some request speculate (SPEC) or decode plainly (PLAIN)."""
        return self._mode_since[0]

    def _note_lone_request(self) -> None:
        """A new request decoding alone: the mode check measures its speculation afresh (ModeCheck.new_lone_request)."""
        decoding = [s.request.request_id for s in self.requests.values() if s.phase is Phase.DECODE]
        if len(decoding) == 1 and decoding[0] != self._lone:
            self._lone = decoding[0]
            self.mode_check.new_lone_request()

    def _decoding(self) -> int:
        return sum(1 for s in self.requests.values() if s.phase is Phase.DECODE)

    def _drafted_levels(
        self, state: RequestState, roots: list[int], width: int, budget: int = 1 << 30
    ) -> tuple[list[list[int]], list[int]]:
        """Levels below `roots` that are drafted already, and the nodes whose expansion would add one."""
        tree, levels, level = state.tree, [], roots
        for _ in range(self.refill_of(state) if width else 0):
            unexpanded = [n for n in level if not tree[n].expanded]
            if unexpanded:
                return levels, unexpanded
            level = self._useful(state, tree.best_children(level, min(width, budget)))
            budget -= len(level)
            if not level:
                break
            levels.append(level)
        return levels, []

    def _ref(self, state: RequestState, node_id: int) -> NodeRef:
        node = state.tree[node_id]
        return NodeRef(node_id, node.parent, node.token, node.position, node.status is Status.ACCEPTED)

    # ---- one pipeline step ---------------------------------------------------------------------
    def schedule(self) -> MicroBatch:
        """One micro-batch: decoding requests first (latency), then prefill chunks, within the budget."""
        self.step += 1
        # the drafting before this batch ran under the plan made before it: whether the pipe waited for it
        batch_record = _Scheduled(self.step, drafted=self._drafting, waited=self.waits_for_draft())
        self._scheduled.append(batch_record)
        if self._plan is not None and self._plan_due(self.step):
            self._plan = None
        rows: list[Row] = []
        members = set()
        states, decoding = self.active(), self._decoding()
        prefill = 0  # prompt rows in this batch
        self._drafting = 0
        prompts = sum(self._prefill_wanted(s) for s in states if s.phase is Phase.PREFILL)  # rows prompts would take
        for state in sorted(states, key=lambda s: s.phase is Phase.PREFILL):
            budget = self.engine.token_budget - len(rows)
            if state.phase is Phase.DECODE:  # a speculative row never takes a prompt's row (a root still goes)
                budget = min(budget, max(budget - prompts, 1 if state.needs_refill else 0))
            if budget <= 0:
                continue
            new_rows = self._rows_for(state, self.width_of(state, decoding), budget)
            if new_rows:
                rows.extend(new_rows)
                prefill += len(new_rows) if state.phase is Phase.PREFILL else 0
                state.inflight += 1
                members.add(state.request.request_id)
        batch = MicroBatch(self._next_batch, rows)
        self._batch_members[batch.batch_id] = members
        # the cost key of this batch: the plan's rows per step, or its prompt chunk's rows if larger (a prefill
        # step costs what its rows cost, whatever the plan)
        batch_record.rows = max(self._plan.rows if self._plan is not None and decoding else 0, prefill)
        batch_record.prefill = prefill > 0
        mode = Mode.SPEC if self._plan is not None and self._plan.speculates else Mode.PLAIN
        if mode is not self.mode:
            self._mode_since = (mode, self.step)
        self._next_batch += 1
        return batch

    def _rows_for(self, state: RequestState, width: int, budget: int) -> list[Row]:
        if state.phase is Phase.PREFILL:
            return self._prefill_rows(state, budget)
        policy = self.policy_of(state.request)
        if state.phase is not Phase.DECODE or state.inflight >= policy.max_inflight:
            return []
        if state.needs_refill:
            return self._refill_rows(state, width, budget - 1)
        if policy.streams_levels and width:
            level = self._useful(state, state.tree.best_children(self._deepest_level(state), min(width, budget)))
            if level:
                state.levels.append(level)
                return self._send(state, level)
        return []

    def _deepest_level(self, state: RequestState) -> list[int]:
        """The deepest sent level with surviving nodes; the next level grows below it."""
        state.levels = [alive for level in state.levels if (alive := [n for n in level if n in state.tree])]
        if state.levels:
            return state.levels[-1]
        return [state.frontier] if state.frontier is not None and not state.needs_refill else []

    def _useful(self, state: RequestState, node_ids: list[int]) -> list[int]:
        """Nodes whose token could still be output (not beyond max_new_tokens)."""
        last = len(state.request.prompt) + state.request.max_new_tokens - 1
        return [n for n in node_ids if state.tree[n].position <= last]

    def _prefill_rows(self, state: RequestState, budget: int) -> list[Row]:
        prompt, rid = state.request.prompt, state.request.request_id
        start = state.prefill_sent
        end = start + min(self._prefill_wanted(state), budget)
        if start >= end:
            return []
        state.prefill_sent = end
        return [
            Row(rid, -(p + 2), -(p + 1), p, prompt[p], committed=True, needs_target=p == len(prompt) - 1)
            for p in range(start, end)
        ]

    def _prefill_wanted(self, state: RequestState) -> int:
        """Prompt rows this request's next chunk would take, before the step's budget cuts it."""
        return min(len(state.request.prompt) - state.prefill_sent, self._prefill_chunk(state))

    def _prefill_chunk(self, state: RequestState) -> int:
        """Rows per prefill micro-batch of this prompt: at most `prefill_chunk`, in equal chunks, and at least one
        chunk per stage where each would keep MIN_PREFILL_ROWS rows, so that the stages compute a prompt's chunks
        at once (pipelined prefill: a 2-stage pipeline takes 1.5 stage-times of a prompt instead of 2). Exact
        numerics tile prompt rows by position, so the chunking never changes a token."""
        n, stages = len(state.request.prompt), self.policy_of(state.request).stages
        chunks = max(-(-n // self.engine.prefill_chunk), min(stages, n // MIN_PREFILL_ROWS))
        return -(-n // max(chunks, 1))

    def _refill_rows(self, state: RequestState, width: int, budget: int) -> list[Row]:
        root = state.tree[state.frontier]
        rid = state.request.request_id
        rows = [Row(rid, root.node_id, ROOT_PARENT, root.position, root.token, committed=True, needs_target=True)]
        levels, _ = self._drafted_levels(state, [root.node_id], width, budget)
        self._scheduled[-1].refill = max(self._scheduled[-1].refill, len(levels))
        for level in levels:
            rows.extend(self._send(state, level))
        state.needs_refill = False
        state.levels = [[root.node_id], *levels]
        if state.stats.first_decode_step is None:
            state.stats.first_decode_step = self.step
        return rows

    def _send(self, state: RequestState, node_ids: list[int]) -> list[Row]:
        """One level's nodes into the pipe; each keeps its rank by score in the level, for the width plan."""
        rid, rows, tree = state.request.request_id, [], state.tree
        for rank, n in enumerate(sorted(node_ids, key=lambda n: (-tree[n].score, n))):
            tree[n].rank = rank
        if node_ids:
            state.level_sizes[tree[node_ids[0]].position] = len(node_ids)
        for n in node_ids:
            node = tree[n]
            node.status = Status.SENT
            rows.append(Row(rid, n, node.parent, node.position, node.token, committed=False, needs_target=True))
        state.stats.sent_speculative += len(node_ids)
        state.stats.drafts += 1
        return rows

    # ---- verification ----------------------------------------------------------------------------
    def update_from_output(self, output: TargetTokens) -> StepResult:
        for request_id in self._batch_members.pop(output.batch_id, set()):
            if request_id in self.requests:
                self.requests[request_id].inflight -= 1
        targets: dict[str, dict[int, int]] = {}
        logprobs: dict[str, dict[int, TokenLogprob]] = {}
        for j, (request_id, node_id, target) in enumerate(zip(output.request_ids, output.node_ids, output.targets)):
            if target >= 0:
                targets.setdefault(request_id, {})[node_id] = target
                if output.logprobs and output.logprobs[j] is not None:
                    logprobs.setdefault(request_id, {})[node_id] = output.logprobs[j]
        result = StepResult()
        for request_id, by_node in targets.items():
            state = self.requests.get(request_id)
            if state is not None and state.phase is not Phase.DONE:
                self._verify(state, by_node, result, logprobs.get(request_id, {}))
        self._verified_tokens += sum(len(tokens) for tokens in result.new_tokens.values())
        return result

    def _verify(self, state: RequestState, targets: dict[int, int], result: StepResult,
                logprobs: dict[int, TokenLogprob]) -> None:
        if state.phase is Phase.PREFILL:
            last_prompt_node = -(len(state.request.prompt) + 1)
            if last_prompt_node not in targets:
                return
            root = state.tree.add_accepted(targets[last_prompt_node], ROOT_PARENT, len(state.request.prompt))
            state.phase, state.frontier, state.needs_refill = Phase.DECODE, root.node_id, True
            state.stats.bonus += 1
            self._emit(state, root.token, result, logprobs.get(last_prompt_node))
            return
        while state.phase is Phase.DECODE and state.frontier in targets:
            frontier = state.frontier
            token = targets[frontier]
            child = state.tree.sent_child_with_token(frontier, token)
            self._count_acceptance(state, frontier, child)
            if child is None:
                self._miss(state, frontier, token, result)
            else:
                self._accept(state, frontier, child, result)
            self._emit(state, token, result, logprobs.get(frontier))

    def _count_acceptance(self, state: RequestState, frontier: int, child: int | None) -> None:
        """One verified level for the width plan: how many nodes the level below the frontier was sent with, and
        the accepted child's rank by score among them. The level counts its nodes under the frontier's pruned
        siblings too: a plan's width buys them as well, so acceptance by width is what the level's width gave."""
        policy = self.policy_of(state.request)
        if not (policy.streams_levels and policy.width_rule == "cost"):
            return  # no plan reads it
        size = state.level_sizes.pop(state.tree[frontier].position + 1, 0)
        if not size and not (self._plan is not None and self._plan.width_of(state.request.request_id)):
            return  # nothing was meant to be sent (PP, or before any plan): not a verification of speculation
        rank = state.tree[child].rank if child is not None else None  # a draft that proposed nothing: a miss
        state.stats.acceptance.record(max(size, 1), rank)
        self.acceptance.record(max(size, 1), rank)

    def _accept(self, state: RequestState, frontier: int, child: int, result: StepResult) -> None:
        tree, rid = state.tree, state.request.request_id
        pruned = [n for c in tree[frontier].children if c != child for n in tree.subtree(c)]
        self._prune(state, pruned, result)
        tree[child].status = Status.ACCEPTED
        result.events.append(PipelineEvent(rid, "commit", (child,)))
        tree.forget_accepted_before(child)
        state.frontier = child
        stats = state.stats
        stats.accepted += 1
        stats.accepted_per_depth[min(stats.run, DEPTH_BINS - 1)] += 1
        stats.run += 1

    def _miss(self, state: RequestState, frontier: int, token: int, result: StepResult) -> None:
        self._prune(state, state.tree.speculative(), result)
        bonus = state.tree.add_accepted(token, frontier, state.tree[frontier].position + 1)
        state.tree.forget_accepted_before(bonus.node_id)
        state.frontier, state.needs_refill, state.levels = bonus.node_id, True, []
        state.level_sizes.clear()  # every sent level was pruned
        state.stats.bonus += 1
        state.stats.run = 0

    def _prune(self, state: RequestState, node_ids: list[int], result: StepResult) -> None:
        if not node_ids:
            return
        state.tree.remove(node_ids)
        state.expanding.difference_update(node_ids)
        state.stats.pruned += len(node_ids)
        result.events.append(PipelineEvent(state.request.request_id, "prune", tuple(node_ids)))

    def _emit(self, state: RequestState, token: int, result: StepResult, logprob: TokenLogprob | None) -> None:
        """Append one target token (and its logprobs, if asked); finish the request at a stop token or the
        length limit."""
        rid = state.request.request_id
        state.output.append(token)
        state.stats.last_token_step = self.step
        result.new_tokens.setdefault(rid, []).append(token)
        if logprob is not None:
            state.logprobs.append(logprob)
            result.new_logprobs.setdefault(rid, []).append(logprob)
        if token in state.request.stop_ids:
            self.finish(state, "stop", result)
        elif len(state.output) >= state.request.max_new_tokens:
            self.finish(state, "length", result)

    def finish(self, state: RequestState, reason: str, result: StepResult) -> None:
        """End a request (done, cancelled or failed): every stage and draft frees it."""
        if state.phase is Phase.DONE:
            return
        state.phase, state.finish_reason = Phase.DONE, reason
        self.retired.add(state.stats)
        state.tree = TokenTree()
        state.levels, state.expanding = [], set()
        result.events.append(PipelineEvent(state.request.request_id, "finish"))
        result.finished.append(state.request.request_id)

    def abort(self, request_id: str, reason: str, result: StepResult) -> bool:
        """End a running request now (cancelled, failed) and forget it; False if it was not running."""
        state = self.requests.get(request_id)
        if state is None or state.phase is Phase.DONE:
            return False
        self.finish(state, reason, result)
        self.remove(request_id)
        return True

    def remove(self, request_id: str) -> None:
        """Forget a finished request (its stats are already in `retired`)."""
        del self.requests[request_id]
