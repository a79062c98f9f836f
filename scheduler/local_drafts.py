"""A lookup draft in the scheduler's own process: the n-gram draft without a draft worker (as vLLM's and
SGLang's n-gram proposers run in the engine).

A prompt lookup computes nothing: a draft worker would spend its time on the wire, not the lookup. Each job
there is an XADD of the request's whole text, a read and a decode in another process, and a reply; after a
miss, a refill's R levels wait for R such round trips, on a host whose cores the stages fill. Here the jobs
are answered in place, in the order DraftChannel gives them (scheduler/drafts.py), so the services' steps are
the executor's, as with a draft worker:
  1. the events the stages apply before step t reach the source first (`publish_events`),
  2. the level sent at step t-1 was drafted right after it went out (`flush`, while the stages computed); its
     proposals enter the trees now (`draft`), after the verification read meanwhile, as the executor orders it,
  3. then round after round, what the scheduler still wants before step t (a refill's levels).
Each expansion's time goes to the width plan as a draft forward's (Scheduler.observe_draft). The lookups do
lengthen the scheduler's own loop (about 0.5 ms a step for 16 requests): with steps of a few ms (GPU stages),
a draft worker on a spare core keeps them beside it (specpipe.cluster.ClusterConfig.local_ngram chooses).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.client import Pipeline

from scheduler.scheduler import Request, Scheduler
from shared.types.batch import PipelineEvent
from shared.types.errors import SpecPipeError
from shared.types.speculation import ExpansionJob, Proposals, SpeculativeSource, times_a_level
from shared.wire.messages import ProposalsMsg

log = logging.getLogger("scheduler")


class LocalDrafts:
    """DraftChannel's interface (the scheduler service drives either) over a source in this process."""

    def __init__(self, scheduler: Scheduler, source: SpeculativeSource,
                 timed: Callable[[float, float, int], None] = lambda start, seconds, nodes: None):
        """`timed(start, seconds, nodes)`: each expansion's time, as a draft worker reports its forwards."""
        self.scheduler, self.source, self.timed = scheduler, source, timed
        self.known: set[str] = set()  # requests the source holds (added at admission, dropped at finish)
        self.arrived: list[tuple[str, int, Proposals]] = []  # drafted off the beat, not yet in the trees

    def begin_run(self, epoch: int, base_step: int) -> None:
        """A new pipeline run: the requests of the last one are recovered afresh, their draft state dropped."""
        self.source.apply([PipelineEvent(request_id, "finish") for request_id in self.known])
        self.known.clear()
        self.arrived = []

    def admitted(self, epoch: int, request: Request) -> None:
        """A request that will be drafted for: the source learns it (and computes its prompt) now."""
        if self.scheduler.policy_of(request).name != "pp":
            self._register(request, list(request.prompt))

    def _register(self, request: Request, text: list[int]) -> None:
        if request.request_id not in self.known:
            self.source.add_request(request.request_id, text, self.scheduler.kv_capacity(request))
            self.source.prefill(request.request_id, text)
            self.known.add(request.request_id)

    def publish_events(self, epoch: int, step: int, events: list[PipelineEvent]) -> None:
        """The events the stages apply before `step`, to the source before any job after them."""
        if events:
            self.source.apply(events)
            self.known.difference_update(e.request_id for e in events if e.kind == "finish")

    def flush(self, epoch: int, pipe: Pipeline | None = None) -> None:
        """Off the beat (while the stages compute): the level just sent, drafted now and kept for `draft`."""
        self.arrived += self._expand()

    def draft(self, epoch: int) -> tuple[float, float]:
        """The level drafted off the beat into the trees, then round after round what the scheduler wants
        before this step. Returns the span's (start, end): the lookups this step waited for."""
        start = time.monotonic()
        drafted, self.arrived = self.arrived, []
        while True:
            for request_id, node_id, proposals in drafted:
                self.scheduler.add_proposals(request_id, node_id, proposals)
            if not (drafted := self._expand()):
                return start, time.monotonic()

    def take(self, p: ProposalsMsg) -> None:
        """A draft worker's answer: none is asked here (one left from another setting is dropped)."""

    def _expand(self) -> list[tuple[str, int, Proposals]]:
        """Every job the scheduler wants now, in one expansion (timed for the width plan); where it fails, job by
        job, and a job that fails alone gets no proposals and resets its request's draft state, as a draft
        worker does: a broken lookup lowers speculation, never the service."""
        jobs = self.scheduler.expansion_jobs()
        if not jobs:
            return []
        for job in jobs:
            self._register(self.scheduler.requests[job.request_id].request, job.text)
        start = time.monotonic()
        try:
            drafted = self.source.expand(jobs)
        except (SpecPipeError, IndexError, KeyError):
            return [answer for job in jobs for answer in self._expand_alone(job)]
        nodes, seconds = sum(len(job.nodes) for job in jobs), time.monotonic() - start
        self.timed(start, seconds, nodes)
        if times_a_level(nodes, self.source.computed_rows):
            self.scheduler.observe_draft(nodes, seconds)
        return drafted

    def _expand_alone(self, job: ExpansionJob) -> list[tuple[str, int, Proposals]]:
        try:
            return self.source.expand([job])
        except (SpecPipeError, IndexError, KeyError) as exc:
            log.warning("scheduler: the draft failed for %s (%s); resetting its draft state", job.request_id, exc)
            self.source.apply([PipelineEvent(job.request_id, "finish")])
            self.known.discard(job.request_id)
            return [(job.request_id, ref.node_id, []) for ref in job.nodes]
