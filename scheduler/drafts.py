"""The scheduler's channel to the draft workers: events and expansion jobs out, proposals in, the bounded wait.

Per step t, as the in-process executor drafts (specpipe/executor.py), within one bounded wait:
  1. the events the stages apply before step t (the last verification's prunes and commits) go to the drafts
     first (`publish_events`), so every job after them is drafted on the tree the stages will have,
  2. the proposals of the jobs published during step t-1 (the level it sent, drafted while the stages
     computed) are waited for,
  3. then, round after round, whatever the scheduler still wants drafted before step t is asked and waited
     for: after a miss, the R levels of the refill below the bonus token (R draft forwards, each one batched
     across the requests that missed).
Right after step t goes out, the events and the jobs that expand the level it sends are published
(`flush`, off the beat: the stages compute meanwhile), so the drafts work while the stages compute; events
go out earlier only when a refill round must ask for jobs after them. Everything waits at most `wait_s` per
step (a lost or slow draft only lowers speculation: a late answer is used whenever it arrives, and no job is
waited for twice).

Jobs and events travel over Redis (a consumer group spreads the jobs over the draft workers and re-assigns a
dead worker's); the proposals come back on the scheduler's control inbox (shared/transport/control.py), which
`receive` polls: it hands every ProposalsMsg to `take`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from redis.client import Pipeline

from scheduler.scheduler import Request, Scheduler
from shared.transport.redis_io import RedisConfig, any_alive, publish_all
from shared.types.batch import PipelineEvent
from shared.types.errors import ConfigError
from shared.wire.messages import DraftEventsMsg, ExpansionJobMsg, ProposalsMsg

ALIVE_CHECK_STEPS = 16  # how often (in steps) the drafts' heartbeats are looked at


class DraftChannel:
    def __init__(self, r: redis.Redis, cfg: RedisConfig, scheduler: Scheduler, wait_s: float,
                 receive: Callable[[int | None], None]):
        """`receive(timeout_ms)` polls the control inbox (None: no wait) and hands proposals to `take`. A wait of
        0 is the policy's draft beside the pipe (PolicyConfig.draft_waits=False): the width plan prices the steps
        by it, so the two must say the same; where the plan chooses (None), `wait_s` bounds its waiting steps."""
        if (wait_s > 0) != (scheduler.policy.draft_waits is not False):
            beside = scheduler.policy.draft_waits is False
            raise ConfigError(f"a draft wait of {1000 * wait_s:g} ms, but the policy's draft "
                              f"{'runs beside the pipe' if beside else 'may be waited for'}")
        self.r, self.cfg, self.scheduler, self.wait_s, self.receive = r, cfg, scheduler, wait_s, receive
        self.alive = True  # some draft worker beats: without one, nothing is asked or waited for
        self.awaiting: set[tuple[str, int]] = set()  # (request, node) of the jobs published and not answered
        self.events_at = 0  # the step of the last DraftEventsMsg: jobs are answered after it is applied
        self.outgoing: list[tuple[str, DraftEventsMsg]] = []  # events not yet sent: they go before the next jobs
        self.warming: list[tuple[str, ExpansionJobMsg]] = []  # admitted requests' prompts, not yet sent
        self.arrived: list[ProposalsMsg] = []  # proposals received, not yet in the trees

    def begin_run(self, epoch: int, base_step: int) -> None:
        """A new pipeline run: nothing asked before it is waited for, and the drafts start it empty."""
        self.awaiting.clear()
        self.outgoing, self.arrived, self.warming = [], [], []
        self._queue_events(epoch, base_step, [])
        publish_all(self.r, self.outgoing, maxlen=10_000)  # at once: a draft worker learns the run from it
        self.outgoing = []

    def admitted(self, epoch: int, request: Request) -> None:
        """A request that will be drafted for: its prompt goes to the drafts with the next jobs (a job with no
        nodes), so that they compute it while the stages prefill it, not at its first expansion. Nothing awaits
        it: a draft worker that has not done it by then catches up as before."""
        if self.scheduler.policy_of(request).name != "pp":
            job = ExpansionJobMsg(request_id=request.request_id, as_of_step=self.events_at, text=list(request.prompt),
                                  nodes=[], top_k=0, capacity=self.scheduler.kv_capacity(request), epoch=epoch)
            self.warming.append((self.cfg.draft_jobs, job))

    def publish_events(self, epoch: int, step: int, events: list[PipelineEvent]) -> None:
        """The events the stages apply before `step`, to the drafts before any job after them (none: nothing
        to send). Sent even while no draft worker beats: one that comes back must not have missed a prune."""
        if events:
            self._queue_events(epoch, step, events)

    def _queue_events(self, epoch: int, step: int, events: list[PipelineEvent]) -> None:
        self.outgoing.append((self.cfg.draft_events, DraftEventsMsg(step=step, events=events, epoch=epoch)))
        self.events_at = step

    def flush(self, epoch: int, pipe: Pipeline | None = None) -> None:
        """Off the beat (while the stages compute): the queued events and the jobs for the level just sent
        (on the caller's pipeline, if given); now and then, whether any draft worker still beats."""
        if self.scheduler.step % ALIVE_CHECK_STEPS == 0:  # a lost draft worker only lowers speculation
            self.alive = any_alive(self.r, self.cfg, "draft-")
        self.ask(epoch, pipe)

    def draft(self, epoch: int) -> tuple[float, float]:
        """Take what arrived; wait (bounded) for the last step's jobs, then ask and wait, round by round, for
        what the scheduler wants drafted before this step (a refill's levels). Returns the wait's (start, end)."""
        start = time.monotonic()
        self.receive(None)
        self._apply_arrived()
        if not self.alive:
            self.awaiting.clear()
            return start, start
        deadline = start + (self.wait_s if self.scheduler.waits_for_draft() else 0.0)  # 0: ask, never wait
        while self._wait(deadline) and self.ask(epoch):
            pass
        self.awaiting.clear()  # a job not answered in time is used whenever it arrives, never waited for again
        return start, time.monotonic()

    def _wait(self, deadline: float) -> bool:
        """Wait for every awaited job until `deadline`; True when all were answered in time."""
        while self.awaiting and (left := deadline - time.monotonic()) > 0:
            self.receive(max(1, int(left * 1000)))
            self._apply_arrived()
        return not self.awaiting

    def ask(self, epoch: int, pipe: Pipeline | None = None) -> bool:
        """Publish the queued events, then jobs for every node the scheduler wants drafted now, in one round
        trip (or on `pipe`); True when there were jobs. They are awaited from here on."""
        jobs = self._jobs(epoch)
        if jobs or pipe is not None:  # events and prompts alone wait for the shadow's round trip (flush)
            warming = self.warming if self.alive else []
            publish_all(pipe or self.r, [*self.outgoing, *warming, *jobs], maxlen=10_000)
            self.outgoing, self.warming = [], []
        return bool(jobs)

    def _jobs(self, epoch: int) -> list[tuple[str, ExpansionJobMsg]]:
        if not self.alive:
            return []
        jobs = self.scheduler.expansion_jobs()
        messages = []
        for job in jobs:
            state = self.scheduler.requests[job.request_id]
            msg = ExpansionJobMsg(request_id=job.request_id, as_of_step=self.events_at, text=job.text, nodes=job.nodes,
                                  top_k=job.top_k, capacity=self.scheduler.kv_capacity(state.request), epoch=epoch)
            messages.append((self.cfg.draft_jobs, msg))
            self.awaiting.update((job.request_id, n.node_id) for n in job.nodes)
        return messages

    def take(self, p: ProposalsMsg) -> None:
        """A draft's answer for one node (from the control inbox), whenever it arrives: kept until the drafts'
        turn (`draft`), so a verification read meanwhile is applied first, as the executor orders them."""
        if len(p.tokens) == len(p.logprobs):
            self.arrived.append(p)

    def _apply_arrived(self) -> None:
        arrived, self.arrived = self.arrived, []
        for p in arrived:
            self.scheduler.add_proposals(p.request_id, p.node_id, list(zip(p.tokens, p.logprobs)))
            self.awaiting.discard((p.request_id, p.node_id))
            if p.forward_nodes:  # the first answer of a draft forward: its time
                self.scheduler.observe_draft(p.forward_nodes, p.forward_s)
