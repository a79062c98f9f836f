"""The scheduler's channel to the draft workers: expansion jobs out, proposals in, the bounded wait.

Right after step t is published, the jobs that expand the level it sends go
out, so the drafts work while the stages compute. Before step t+1, the
proposals of those jobs are waited for, at most `wait_s` (a lost or slow draft
only lowers speculation: a late answer is used whenever it arrives, and no
job is waited for twice). Jobs that need step t's events (a refill after a
miss) go out then, and are waited for before the step after.
"""

from __future__ import annotations

import time

import redis

from scheduler.scheduler import Scheduler
from shared.transport.redis_io import RedisConfig, any_alive, decode_or_log, publish, read, tail_id
from shared.wire.messages import ExpansionJobMsg, ProposalsMsg


class DraftChannel:
    def __init__(self, r: redis.Redis, cfg: RedisConfig, scheduler: Scheduler, wait_s: float):
        self.r, self.cfg, self.scheduler, self.wait_s = r, cfg, scheduler, wait_s
        self.alive = True  # some draft worker beats: without one, nothing is asked or waited for
        self.awaiting: set[tuple[str, int]] = set()  # (request, node) of the jobs published since the last wait
        self.last = "$"  # the proposals stream, read after this entry

    def start(self) -> None:
        self.last = tail_id(self.r, self.cfg.proposals)

    def reset(self) -> None:
        """A new pipeline run: nothing asked before it is waited for."""
        self.awaiting.clear()

    def wait(self) -> tuple[float, float]:
        """Take what arrived, waiting (bounded) for the last step's jobs; returns the wait's (start, end)."""
        if self.scheduler.step % 16 == 0:  # a lost draft worker only lowers speculation
            self.alive = any_alive(self.r, self.cfg, "draft-")
        start = time.monotonic()
        if not self.alive:
            self.awaiting.clear()
            return start, start
        self._take(block_ms=None)
        start = time.monotonic()
        deadline = start + self.wait_s
        while self.awaiting and (left := deadline - time.monotonic()) > 0:
            self._take(block_ms=max(1, int(left * 1000)))
        self.awaiting.clear()  # a job not answered in time is used whenever it arrives, never waited for again
        return start, time.monotonic()

    def ask(self, as_of_step: int, epoch: int) -> None:
        """Jobs for every node the scheduler wants drafted; a worker first applies the step records up to
        (epoch, as_of_step): that record's events are the tree the job describes."""
        if not self.alive:
            return
        for job in self.scheduler.expansion_jobs():
            state = self.scheduler.requests[job.request_id]
            msg = ExpansionJobMsg(request_id=job.request_id, as_of_step=as_of_step, text=job.text, nodes=job.nodes,
                                  top_k=job.top_k, capacity=self.scheduler.kv_capacity(state.request), epoch=epoch)
            publish(self.r, self.cfg.draft_jobs, msg)
            self.awaiting.update((job.request_id, n.node_id) for n in job.nodes)  # answered during the next step

    def _take(self, block_ms: int | None) -> None:
        for entry_id, raw in read(self.r, self.cfg.proposals, self.last, block_ms=block_ms):
            self.last = entry_id
            p = decode_or_log(raw, ProposalsMsg, "scheduler")
            if p is not None and len(p.tokens) == len(p.logprobs):
                self.scheduler.add_proposals(p.request_id, p.node_id, list(zip(p.tokens, p.logprobs)))
                self.awaiting.discard((p.request_id, p.node_id))
