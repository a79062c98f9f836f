"""In-process pipeline: N logical stages in lockstep, the reference executor.

One step = one pipeline beat:
  1. the draft source answers every expansion job (in process: synchronously,
     so the step sees a fully drafted tree; the distributed runtime drafts the
     next level while the stages compute and waits for it, bounded),
  2. the scheduler forms stage 0's micro-batch,
  3. every stage computes the micro-batch it received one step earlier,
  4. what leaves the last stage is verified, and the resulting prune/commit
     events reach every stage, every in-flight micro-batch and the draft
     before the next step's compute. Under async scheduling
     (PolicyConfig.async_scheduling) what leaves the last stage is verified
     one step later, after the next step's micro-batch is formed, as the
     scheduler service does while the stages compute.
The trace records, per step, which nodes each stage computed.

With a DraftLane (a modeled deployment, PolicyConfig.draft_waits=False) the
draft is never waited for: it runs beside the pipe on its own clock, each
forward starting when the last one ended (levels go ahead of prompts not
started yet, and expansions asked meanwhile join the level queued, as a
draft worker serves a read), and its
proposals reach the scheduler at the first step that starts after it; a
request's prompt is drafted from its admission, while the target prefills
it. Where the width plan chooses (draft_waits=None), a step of a plan that
waits drafts as above (1.), one of a plan that does not on the lane, and
whatever the lane still computes reaches the scheduler when it ends, under
either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.occupancy import Occupancy
from scheduler.scheduler import Phase, Request, RequestState, Scheduler, StepResult
from shared.compute.runner import RequestInfo, StageRunner
from shared.types.batch import MicroBatch, PipelineEvent, StageOutput
from shared.types.errors import SpecPipeError
from shared.types.speculation import SpeculativeSource, times_a_level


@dataclass
class StepTrace:
    step: int
    stages: list[list[tuple[str, int, int]]]  # per stage: (request, node, token) computed
    new_tokens: dict[str, list[int]]
    pruned: int
    draft_rows: list[int] = field(default_factory=list)  # rows each draft forward before this step computed


@dataclass
class _Forward:
    """One forward on the lane: what it computes and proposes, how long it takes, and when it runs."""

    length: float  # seconds
    rows: int
    context: float
    nodes: int  # frontier nodes it expands (0: a prompt's, or a waiting step's drafting)
    proposals: list
    prompt: bool = False  # a prompt's: levels asked while it waits to start go ahead of it
    start: float = 0.0
    end: float = 0.0


@dataclass
class DraftLane:
    """The draft's device beside the pipe, on the driver's clock: forwards run one after another, and what they
    propose is held until each ends. As a draft worker serves a read (draft_worker/service.py), levels go ahead of
    the prompts that have not started yet, and expansions asked while the last level asked has not started join
    it (one forward over every job of a read); a prompt is a forward of its own."""

    seconds: Callable[[int, float], float]  # one forward's seconds over (rows, context length)
    observe: Callable[[int, float], None] | None = None  # told (frontier nodes, seconds) of each expansion forward
    now: float = 0.0  # when the step about to run starts (the driver sets it)
    busy: float = 0.0  # seconds of forwards in all (a waiting step's drafting aside)
    pending: list[_Forward] = field(default_factory=list)  # in the order they run

    def run(self, rows: int, context: float, proposals: list, nodes: int = 0) -> None:
        """A forward asked now: it computes `rows` rows (`nodes` of them frontier nodes to expand; none: a prompt)."""
        at = len(self.pending) if not nodes else self._ahead_of_prompts()
        last = self.pending[at - 1] if at else None
        if nodes and last is not None and last.nodes and last.start > self.now:  # not started: join it
            last.rows, last.nodes, last.context = last.rows + rows, last.nodes + nodes, max(last.context, context)
            last.proposals += proposals
            length = self.seconds(last.rows, last.context)
            self.busy += length - last.length
            last.length = length
            self._retime(at - 1)
            return
        forward = _Forward(self.seconds(rows, context), rows, context, nodes, proposals, prompt=not nodes)
        self.busy += forward.length
        self.pending.insert(at, forward)
        self._retime(at)

    @property
    def free_at(self) -> float:
        """When the last forward queued ends (now, when none is)."""
        return self.pending[-1].end if self.pending else self.now

    def occupy(self, seconds: float) -> float:
        """The draft's device taken for `seconds` (a waiting step's drafting), ahead of the prompts that have not
        started; returns how long from now until that ends."""
        at = self._ahead_of_prompts()
        self.pending.insert(at, _Forward(seconds, 0, 0.0, 0, []))
        self._retime(at)
        return self.pending[at].end - self.now

    def ready(self) -> list:
        """The proposals of every forward that has ended by now (each expansion's time told as it ends)."""
        out = []
        while self.pending and self.pending[0].end <= self.now:
            f = self.pending.pop(0)
            if self.observe is not None and times_a_level(f.nodes, f.rows):
                self.observe(f.nodes, f.length)
            out += f.proposals
        return out

    def _ahead_of_prompts(self) -> int:
        """Where a level asked now goes: after every forward started and every level queued, before the prompts
        still waiting to start."""
        return max((i + 1 for i, f in enumerate(self.pending) if f.start <= self.now or not f.prompt), default=0)

    def _retime(self, at: int) -> None:
        """The forwards from `at` on (none started) run one after another, none before now (all were asked)."""
        t = self.pending[at - 1].end if at else self.now
        for f in self.pending[at:]:
            f.start = max(t, self.now)
            f.end = t = f.start + f.length


class InProcessPipeline:
    def __init__(
        self,
        stages: list[StageRunner],
        scheduler: Scheduler,
        draft: SpeculativeSource | None = None,
        trace_limit: int = 0,
        occupancy: Occupancy | None = None,
    ):
        if scheduler.policy.name != "pp" and draft is None:
            raise SpecPipeError(f"policy '{scheduler.policy.name}' needs a draft source")
        self.stages = stages
        self.scheduler = scheduler
        self.draft = draft
        self.in_flight: list[MicroBatch | None] = [None] * (len(stages) - 1)  # input of stage s + 1
        # the last stage's outputs not yet verified: under async scheduling a step's verification is read after
        # the next step is scheduled (PolicyConfig.async_scheduling), as the scheduler service reads it
        self.unverified: deque[StageOutput | None] = deque()
        self.trace: deque[StepTrace] = deque(maxlen=trace_limit or None)
        self.trace_enabled = trace_limit > 0
        self.occupancy = occupancy  # stage x step fates, as the distributed scheduler publishes them
        self.failed: dict[str, str] = {}  # request -> why a stage failed it alone (it ended with an error)
        self.lane: DraftLane | None = None  # the draft beside the pipe, never waited for (the driver's clock)

    def submit(self, request: Request) -> RequestState:
        state = self.scheduler.add_request(request)
        capacity = self.scheduler.kv_capacity(request)
        info = RequestInfo(len(request.prompt), request.sampling)
        for stage in self.stages:
            stage.add_request(request.request_id, info, capacity)
        if self.draft is not None:
            self.draft.add_request(request.request_id, list(request.prompt), capacity)
            if self.lane is not None and (rows := self.draft.prefill(request.request_id, list(request.prompt))):
                self.lane.run(rows, len(request.prompt), [])  # the prompt, drafted while the target prefills it
        return state

    def step(self) -> StepResult:
        beside = self.lane is not None and not self.scheduler.waits_for_draft()
        if self.lane is not None:
            self._take_ready()
        draft_rows = [] if beside else self._draft()
        incoming = [self.scheduler.schedule(), *self.in_flight]
        if beside:  # the level just sent is drafted while the stages compute
            self._draft_beside()
        outputs = [stage.forward(batch) if batch is not None else None for stage, batch in zip(self.stages, incoming)]
        self.in_flight = outputs[:-1]
        self.unverified.append(outputs[-1])
        last = self.unverified.popleft() if len(self.unverified) > self.scheduler.policy.lag else None
        result = self.scheduler.update_from_output(last.target_tokens()) if last is not None else StepResult()
        self._fail(result)
        self._apply(result.events)
        if self.trace_enabled:
            self._record(incoming, result, draft_rows)
        if self.occupancy is not None:
            self.occupancy.record(self.scheduler.step, incoming[0].rows, result.events)
        return result

    def _draft(self) -> list[int]:
        """Answer expansion jobs until the scheduler wants nothing more this step."""
        rows = []
        while self.draft is not None and (jobs := self.scheduler.expansion_jobs()):
            for request_id, node_id, proposals in self.draft.expand(jobs):
                self.scheduler.add_proposals(request_id, node_id, proposals)
            rows.append(self.draft.computed_rows)
        return rows

    def _take_ready(self) -> None:
        """The lane's proposals that are ready by now; none of its forwards is on this step's path."""
        for request_id, node_id, proposals in self.lane.ready():
            self.scheduler.add_proposals(request_id, node_id, proposals)

    def _draft_beside(self) -> None:
        """The jobs the scheduler wants now, as one forward on the lane (not on this step's critical path)."""
        if self.draft is None or not (jobs := self.scheduler.expansion_jobs()):
            return
        proposals = self.draft.expand(jobs)
        context = max(ref.position for job in jobs for ref in job.nodes)
        self.lane.run(self.draft.computed_rows, context, proposals, sum(len(job.nodes) for job in jobs))

    def _fail(self, result: StepResult) -> None:
        """Requests a stage could not compute end with an error (as the distributed scheduler ends them)."""
        for stage in self.stages:
            for request_id, why in stage.take_failures().items():
                self.failed[request_id] = why
                self.scheduler.abort(request_id, "error", result)

    def _apply(self, events: list[PipelineEvent]) -> None:
        if not events:
            return
        pruned: dict[str, set[int]] = {}
        finished = set()
        for event in events:
            if event.kind == "prune":
                pruned.setdefault(event.request_id, set()).update(event.node_ids)
            elif event.kind == "finish":
                finished.add(event.request_id)
        self.in_flight = [b.without(pruned, finished) if b is not None else None for b in self.in_flight]
        for stage in self.stages:
            stage.apply(events)
        if self.draft is not None:
            self.draft.apply(events)

    def _record(self, incoming: list[MicroBatch | None], result: StepResult, draft_rows: list[int]) -> None:
        stages = [[(r.request_id, r.node_id, r.token) for r in b.rows] if b is not None else [] for b in incoming]
        pruned = sum(len(e.node_ids) for e in result.events if e.kind == "prune")
        self.trace.append(StepTrace(self.scheduler.step, stages, result.new_tokens, pruned, draft_rows))

    def run(self, max_steps: int = 1_000_000) -> None:
        """Step until every submitted request is done."""
        for _ in range(max_steps):
            if all(s.phase is Phase.DONE for s in self.scheduler.requests.values()):
                return
            self.step()
        raise SpecPipeError(f"pipeline did not finish within {max_steps} steps")

    def generate(self, request: Request) -> RequestState:
        """Serve one request alone (latency mode) and return its final state."""
        state = self.submit(request)
        self.run()
        return state
