"""Modeled time: give every counted pipeline step a duration from a cost model.

The executor counts steps with the real models (so acceptance, misses and
batching are real) and each step is recorded compactly (StepRecord); the cost
model (benchmarks/costmodel.py) says how long it would take on the measured
hardware. Records do not depend on the cost model, so one run can be timed
with several (this CPU, a GPU):

    pipeline step  = max over stages s of  layers_s x layer(n_s, L_s) (+ head on the last stage)
                     + transfer(max_s n_s)                           (N > 1)
    draft          = sum over the draft forwards the step needed of  draft.forward(m, L)
    pp             step = pipeline step
    tree           step = pipeline step + draft   (the round's tree must be drafted before it enters)
    specpipe       step = max(pipeline step, draft)   (the draft runs beside the pipe; when it is
                   slower it paces the levels: such steps are counted as draft-bound)

n_s is the micro-batch stage s computed in that step and L_s the mean context
length of its rows' requests. Requests arrive on the modeled clock (open loop:
Poisson times; closed loop: a new one whenever one finishes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.costmodel import CostModel
from scheduler.scheduler import Phase, Request
from shared.types.config import split_layers
from specpipe.executor import DraftLane, InProcessPipeline


@dataclass
class StepRecord:
    rows: list[int]  # per stage: rows computed
    lengths: list[float]  # per stage: mean context length of those rows' requests
    draft_rows: list[int]  # rows of each draft forward the step needed
    tokens: dict[str, int]  # request -> tokens emitted at the end of the step

    def to_json(self) -> list:
        return [self.rows, [round(x, 1) for x in self.lengths], self.draft_rows, self.tokens]

    @classmethod
    def from_json(cls, data: list) -> StepRecord:
        return cls(*data)


def record(pipe: InProcessPipeline) -> StepRecord:
    """The executor's last step (its trace must be enabled)."""
    trace = pipe.trace[-1]
    lengths = {rid: len(s.request.prompt) + len(s.output) for rid, s in pipe.scheduler.requests.items()}
    per_stage = [sum(lengths.get(r[0], 0) for r in rows) / max(len(rows), 1) for rows in trace.stages]
    return StepRecord([len(rows) for rows in trace.stages], per_stage, list(trace.draft_rows),
                      {rid: len(t) for rid, t in trace.new_tokens.items()})


class StepClock:
    """Durations of recorded steps under one cost model."""

    def __init__(self, cost: CostModel, policy: str, num_layers: int, stages: int):
        self.cost, self.policy = cost, policy
        self.layers = [b - a for a, b in split_layers(num_layers, stages)]

    def parts(self, rec: StepRecord) -> tuple[float, float]:
        """(the pipe's seconds, the draft's sequential forwards' seconds) of one step."""
        last = len(rec.rows) - 1
        pipe = max(self.cost.target.forward(n, length, self.layers[s], head=s == last)
                   for s, (n, length) in enumerate(zip(rec.rows, rec.lengths)))
        if last > 0:
            pipe += self.cost.transfer(max(rec.rows))
        context = max(rec.lengths)
        return pipe, sum(self.draft_forward(m, context) for m in rec.draft_rows)

    def draft_forward(self, rows: int, context: float) -> float:
        """One draft forward's seconds (0: a lookup, no draft model)."""
        return self.cost.draft.forward(rows, context) if self.cost.draft else 0.0

    def duration(self, rec: StepRecord) -> tuple[float, bool]:
        """(seconds, draft-bound?) of one step."""
        return self.combine(*self.parts(rec))

    def combine(self, pipe: float, draft: float) -> tuple[float, bool]:
        """(seconds, draft-bound?) of a step from its parts: the draft runs while the stages compute (specpipe)."""
        if self.policy == "tree":
            return pipe + draft, False
        if self.policy == "specpipe":
            return max(pipe, draft), draft > pipe
        return pipe, False


@dataclass
class RequestTimes:
    arrival: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tbt(self) -> float | None:
        """Mean time between tokens: first token to last over tokens - 1."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclass
class ModeledRun:
    requests: dict[str, RequestTimes]
    outputs: dict[str, list[int]]
    steps: int
    seconds: float  # modeled wall time from the first arrival to the last token
    draft_bound_steps: int
    records: list[StepRecord]
    draft_busy_s: float = 0.0  # seconds the draft beside the pipe computed (DraftLane), 0 where it is waited for

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs.values())


def replay(records: list[StepRecord], clock: StepClock, arrival: float = 0.0) -> tuple[RequestTimes, int]:
    """One request's token times (it arrived at `arrival` and ran alone) and its draft-bound steps."""
    times, now, bound = RequestTimes(arrival), arrival, 0
    for rec in records:
        seconds, is_bound = clock.duration(rec)
        now, bound = now + seconds, bound + is_bound
        for n in rec.tokens.values():
            times.token_times += [now] * n
    return times, bound


def run_modeled(pipe: InProcessPipeline, clock: StepClock | None, requests: list[Request],
                arrivals: list[float] | None = None, concurrency: int | None = None,
                max_steps: int = 1_000_000) -> ModeledRun:
    """Serve `requests` at `arrivals` (open loop) or `concurrency` at a time (closed loop).

    With clock=None every step counts zero seconds (only the step records matter). A policy whose pipe may run
    without waiting for the draft (PolicyConfig.draft_waits False, or None: the width plan chooses) gets the
    draft beside it on this clock (DraftLane).
    """
    pipe.trace_enabled = True
    if clock and pipe.scheduler.policy.draft_waits is not True:
        pipe.lane = DraftLane(clock.draft_forward, pipe.scheduler.observe_draft)
    pending = list(zip(arrivals or [0.0] * len(requests), requests))
    times: dict[str, RequestTimes] = {}
    outputs: dict[str, list[int]] = {}
    records: list[StepRecord] = []
    now, draft_bound = 0.0, 0
    for _ in range(max_steps):
        if pipe.lane is not None:
            pipe.lane.now = now  # what it drafts from here (a prompt admitted, the level sent) starts now
        live = sum(1 for s in pipe.scheduler.requests.values() if s.phase is not Phase.DONE)
        while pending and (pending[0][0] <= now if concurrency is None else live < concurrency):
            at, request = pending.pop(0)
            pipe.submit(request)
            times[request.request_id] = RequestTimes(max(at, now) if concurrency is None else now)
            outputs[request.request_id] = []
            live += 1
        if live == 0:
            if not pending:
                break
            now = max(now, pending[0][0])  # idle until the next arrival
            continue
        result = pipe.step()
        records.append(record(pipe))
        seconds, bound = 0.0, False
        if clock:  # as the services report their measured beats and draft waits
            pipe_s, draft_s = clock.parts(records[-1])
            if pipe.lane is not None and draft_s:  # a waiting step's drafting queues behind the lane's: one device
                draft_s = pipe.lane.occupy(draft_s)
            seconds, bound = clock.combine(pipe_s, draft_s)
            pipe.scheduler.observe_step(seconds, seconds - pipe_s if bound else 0.0)
            if pipe.lane is not None and pipe.lane.pending and not any(records[-1].rows):
                seconds = max(seconds, pipe.lane.pending[0].end - now)  # nothing in the pipe: it idles for the draft
        now, draft_bound = now + seconds, draft_bound + bound
        for rid, tokens in result.new_tokens.items():
            times[rid].token_times += [now] * len(tokens)
            outputs[rid] += tokens
    start = min((t.arrival for t in times.values()), default=0.0)
    busy = pipe.lane.busy if pipe.lane is not None else 0.0
    return ModeledRun(times, outputs, len(records), now - start, draft_bound, records, busy)
