"""The scheduler's channel to the draft workers: events and expansion jobs out, proposals in, the bounded wait.

Per step t, as the in-process executor drafts (specpipe/executor.py), within one bounded wait:
  1. the events the stages apply before step t (the last verification's prunes and commits) go to the drafts
     first (`publish_events`), so every job after them is drafted on the tree the stages will have,
  2. the proposals of the jobs published during step t-1 (the level it sent, drafted while the stages
     computed) are waited for,
  3. then, round after round, whatever the scheduler still wants drafted before step t is asked and waited
     for: after a miss, the R levels of the refill below the bonus token (R draft forwards, each one batched
     across the requests that missed).
Right after step t goes out, the jobs that expand the level it sends are published (`ask`), so the drafts
work while the stages compute. Everything waits at most `wait_s` per step (a lost or slow draft only lowers
speculation: a late answer is used whenever it arrives, and no job is waited for twice).
"""

from __future__ import annotations

import time

import redis

from scheduler.scheduler import Scheduler
from shared.transport.redis_io import RedisConfig, any_alive, decode_or_log, publish, publish_all, read, tail_id
from shared.types.batch import PipelineEvent
from shared.wire.messages import DraftEventsMsg, ExpansionJobMsg, ProposalsMsg


class DraftChannel:
    def __init__(self, r: redis.Redis, cfg: RedisConfig, scheduler: Scheduler, wait_s: float):
        self.r, self.cfg, self.scheduler, self.wait_s = r, cfg, scheduler, wait_s
        self.alive = True  # some draft worker beats: without one, nothing is asked or waited for
        self.awaiting: set[tuple[str, int]] = set()  # (request, node) of the jobs published and not answered
        self.last = "$"  # the proposals stream, read after this entry
        self.events_at = 0  # the step of the last DraftEventsMsg: jobs are answered after it is applied

    def start(self) -> None:
        self.last = tail_id(self.r, self.cfg.proposals)

    def begin_run(self, epoch: int, base_step: int) -> None:
        """A new pipeline run: nothing asked before it is waited for, and the drafts start it empty."""
        self.awaiting.clear()
        self._publish_events(epoch, base_step, [])

    def publish_events(self, epoch: int, step: int, events: list[PipelineEvent]) -> None:
        """The events the stages apply before `step`, to the drafts first (none: nothing to send). Sent even
        while no draft worker beats: one that comes back must not have missed a prune."""
        if events:
            self._publish_events(epoch, step, events)

    def _publish_events(self, epoch: int, step: int, events: list[PipelineEvent]) -> None:
        publish(self.r, self.cfg.draft_events, DraftEventsMsg(step=step, events=events, epoch=epoch), maxlen=10_000)
        self.events_at = step

    def draft(self, epoch: int) -> tuple[float, float]:
        """Take what arrived; wait (bounded) for the last step's jobs, then ask and wait, round by round, for
        what the scheduler wants drafted before this step (a refill's levels). Returns the wait's (start, end)."""
        if self.scheduler.step % 16 == 0:  # a lost draft worker only lowers speculation
            self.alive = any_alive(self.r, self.cfg, "draft-")
        start = time.monotonic()
        if not self.alive:
            self.awaiting.clear()
            return start, start
        self._take(block_ms=None)
        deadline = start + self.wait_s
        while self._wait(deadline) and self.ask(epoch):
            pass
        self.awaiting.clear()  # a job not answered in time is used whenever it arrives, never waited for again
        return start, time.monotonic()

    def _wait(self, deadline: float) -> bool:
        """Wait for every awaited job until `deadline`; True when all were answered in time."""
        while self.awaiting and (left := deadline - time.monotonic()) > 0:
            self._take(block_ms=max(1, int(left * 1000)))
        return not self.awaiting

    def ask(self, epoch: int) -> bool:
        """Publish jobs for every node the scheduler wants drafted now (after the events published so far), in
        one round trip; True when there were any."""
        messages = self.jobs(epoch)
        publish_all(self.r, messages)
        return bool(messages)

    def jobs(self, epoch: int) -> list[tuple[str, ExpansionJobMsg]]:
        """The job messages for every node the scheduler wants drafted now, to publish at once; they are
        awaited from here on."""
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

    def _take(self, block_ms: int | None) -> None:
        for entry_id, raw in read(self.r, self.cfg.proposals, self.last, block_ms=block_ms):
            self.last = entry_id
            p = decode_or_log(raw, ProposalsMsg, "scheduler")
            if p is not None and len(p.tokens) == len(p.logprobs):
                self.scheduler.add_proposals(p.request_id, p.node_id, list(zip(p.tokens, p.logprobs)))
                self.awaiting.discard((p.request_id, p.node_id))
