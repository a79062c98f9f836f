"""A lookup draft answered in the scheduler's process (scheduler/local_drafts.py), without Redis or stages."""

from __future__ import annotations

import pytest

from scheduler.local_drafts import LocalDrafts
from scheduler.scheduler import Request, Scheduler
from shared.drafting.ngram import NgramSource
from shared.types.batch import PipelineEvent
from shared.types.config import EngineConfig, PolicyConfig
from shared.types.speculation import ExpansionJob
from tests.scheduler.test_scheduler_state import FakeDraft, FakePipeline

pytestmark = pytest.mark.unit


class Source(FakeDraft):
    """FakeDraft as a SpeculativeSource: it records the requests it holds and the events it follows."""

    name, computed_rows = "fake", 0

    def __init__(self, fail: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.fail = fail  # a request whose expansion raises (a broken draft state)
        self.held: set[str] = set()
        self.events: list[PipelineEvent] = []

    def add_request(self, request_id: str, prompt: list[int], capacity: int) -> None:
        self.held.add(request_id)

    def prefill(self, request_id: str, prompt: list[int]) -> int:
        return 0

    def expand(self, jobs: list[ExpansionJob]) -> list:
        if any(job.request_id == self.fail for job in jobs):
            raise KeyError(self.fail)
        return super().expand(jobs)

    def apply(self, events: list[PipelineEvent]) -> None:
        self.events += events
        self.held.difference_update(e.request_id for e in events if e.kind == "finish")


class ServiceOrder(FakePipeline):
    """The scheduler service's order: the events, then `draft` before each step; `flush` right after the step is
    sent (before its verification is read)."""

    def __init__(self, policy: PolicyConfig, source: Source):
        super().__init__(policy, EngineConfig(prefill_chunk=8), source)
        self.local = LocalDrafts(self.sched, source)
        self.events: list[PipelineEvent] = []
        schedule = self.sched.schedule

        def schedule_then_flush():
            batch = schedule()
            self.local.flush(epoch=0)
            return batch

        self.sched.schedule = schedule_then_flush

    def submit(self, request: Request) -> None:
        super().submit(request)
        self.local.admitted(0, request)

    def _draft(self) -> int:
        self.local.publish_events(0, self.sched.step + 1, self.events)
        self.local.draft(epoch=0)
        return 0

    def step(self):
        result = super().step()
        self.events = list(result.events)
        return result


REQUESTS = [(0, Request("a", (3, 1, 4, 1, 5, 9, 2, 6), max_new_tokens=24)),
            (2, Request("b", (2, 7, 1, 8, 2, 8), max_new_tokens=16))]
# label: policy, draft accuracy (misses refill R levels below the bonus token, drafted in one `draft` call)
ORDERS = {
    "specpipe, 3 stages, a perfect draft": (PolicyConfig("specpipe", 3, 2, width_rule="budget"), 1.0),
    "specpipe, 3 stages, misses": (PolicyConfig("specpipe", 3, 2, refill_depth=2, width_rule="budget"), 0.6),
    "specpipe, 4 stages, width 1, misses": (PolicyConfig("specpipe", 4, 1, refill_depth=3, width_rule="budget"), 0.5),
    "tree, 2 stages, misses": (PolicyConfig("tree", 2, 2, width_rule="budget"), 0.6),
}


@pytest.mark.parametrize("case", list(ORDERS))
def test_the_service_order_steps_as_the_executor(case) -> None:
    """Drafted right after a step goes out and entered before the next, the trees grow as the executor's (which
    drafts at each step's start): the same rows every step, the same tokens, plain decoding's."""
    policy, accuracy = ORDERS[case]
    executor = FakePipeline(policy, EngineConfig(prefill_chunk=8), Source(accuracy=accuracy))
    executor.run(REQUESTS)
    service = ServiceOrder(policy, Source(accuracy=accuracy))
    service.run(REQUESTS)
    assert service.occupancy == executor.occupancy
    for rid in ("a", "b"):
        assert service.sched.requests[rid].output == executor.expected[rid]
    assert service.sched.draft_known()  # each expansion timed for the width plan
    service.local.publish_events(0, service.sched.step + 1, service.events)  # the last step's, with the next step
    assert not service.draft.held and not service.local.known  # every finish reached the source


def test_a_failing_request_loses_speculation_not_the_service() -> None:
    """A source that raises for one request: that request's nodes get no proposals and its draft state is reset
    (it is registered again at its next job); the others are drafted; every output is plain decoding's."""
    policy = PolicyConfig("specpipe", 3, 2, width_rule="budget")
    service = ServiceOrder(policy, Source(fail="b"))
    service.run(REQUESTS)
    for rid in ("a", "b"):
        assert service.sched.requests[rid].output == service.expected[rid]
    assert service.sched.requests["a"].stats.accepted > 0
    assert service.sched.requests["b"].stats.accepted == 0


def test_a_new_run_forgets_the_last_runs_requests() -> None:
    """Its requests are recovered afresh: the source drops their state (their mirrors' node ids start again)."""
    scheduler = Scheduler(PolicyConfig("specpipe", 2, 2), EngineConfig(), context_limit=4096)
    source = NgramSource()
    local = LocalDrafts(scheduler, source)
    for rid in ("a", "b"):
        request = Request(rid, (5, 6, 5, 6, 5), max_new_tokens=4)
        scheduler.add_request(request)
        local.admitted(0, request)
    local.admitted(0, Request("p", (1, 2), max_new_tokens=4, policy=PolicyConfig("pp", 2, 1)))
    assert set(source.mirrors) == {"a", "b"} == local.known  # a pp request is never drafted for
    local.begin_run(1, base_step=0)
    assert not source.mirrors and not local.known
