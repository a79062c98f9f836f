"""`python -m stage_worker --rank k --world N`: one pipeline stage as a process.

Per step t (lockstep with the scheduler):
  1. take StepMsg t from this stage's control inbox (shared/transport/control.py): register admitted
     requests, apply prune/commit/finish,
  2. take the input: stage 0 from the StepMsg rows, stage k > 0 from stage k-1 (step t-1),
     minus every row pruned or finished by now,
  3. compute this stage's layers,
  4. send the output to stage k+1, or (last stage) send the target tokens as VerifyMsg to the scheduler's
     control inbox.
Redis carries the run membership, heartbeats, errors and timings: nothing on the beat.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from shared.compute.runner import RequestInfo, StageRunner
from shared.transport.control import ControlConfig, Inbox, Outbox
from shared.transport.membership import (
    PipelineRun,
    close_rendezvous,
    current_run,
    mark_joined,
    publish_control,
    publish_rendezvous,
    rendezvous_address,
)
from shared.transport.redis_io import OffBeatWriter, RedisConfig, connect, publish, stage_name, start_heartbeat
from shared.types.batch import MicroBatch
from shared.types.errors import SpecPipeError
from shared.wire.messages import AdmittedRequest, StageErrorMsg, StepMsg, VerifyMsg
from stage_worker.link import (
    ActivationLink,
    LinkConfig,
    LinkLost,
    RendezvousAbandoned,
    host_store,
    join_store,
    wait_for_peers,
)
from stage_worker.telemetry import StageTelemetry

log = logging.getLogger("stage_worker")


@dataclass(frozen=True)
class StageServiceConfig:
    rank: int
    world: int
    redis: RedisConfig
    link: LinkConfig | None = None  # None: a one-stage pipeline (no peers); the link uses the runner's device
    poll_ms: int = 250  # an idle stage checks for a new run this often
    control: ControlConfig = ControlConfig()  # this stage's control inbox (StepMsgs)
    stats_interval_s: float = 0.5  # how often the stats snapshot (KV use: metrics, dashboard) is rewritten


class StageService:
    def __init__(self, cfg: StageServiceConfig, runner: StageRunner):
        self.cfg, self.runner = cfg, runner
        self.link: ActivationLink | None = None
        self.store = None  # this run's rendezvous store (stage 0 hosts it: kept alive with the group)
        self.r = connect(cfg.redis)
        self.inbox = Inbox(cfg.control)
        self.scheduler = Outbox()  # the run's scheduler inbox: the last stage's VerifyMsgs
        self.run_: PipelineRun | None = None  # the run this stage has joined
        self.step_no = 0  # the last step computed
        self.slots: dict[str, int] = {}  # request id -> slot in link headers
        self.ids: dict[int, str] = {}
        self.finished: set[str] = set()
        self.name = stage_name(cfg.rank)
        self.compute_s = 0.0
        # "step:start:compute_s" (time.monotonic(), one clock for every process on a host), flushed to Redis in
        # batches: benchmarks.wire_overhead's split of a step
        self.timings: list[str] = []
        self.writer = OffBeatWriter(cfg.redis, self.name)  # timings and stats, between steps
        self.telemetry = StageTelemetry(self.writer, cfg.redis, cfg.rank, cfg.stats_interval_s)

    def run(self, stop_after_idle_s: float | None = None) -> None:
        # before joining: the scheduler reads the stages' inboxes once every stage has joined
        publish_control(self.r, self.cfg.redis, self.name, self.inbox.address)
        self.join()
        start_heartbeat(self.cfg.redis, self.name)
        w = self.runner.weights
        log.info("%s ready: layers %d-%d of %d (%s on %s), torch %d threads, link %s, run %d", self.name, w.start,
                 w.end - 1, self.runner.arch.num_layers, self.runner.dtype, self.runner.device,
                 torch.get_num_threads(), "none" if self.link is None else self.link.backend, self.run_.epoch)
        idle_since = time.monotonic()
        while True:
            messages = self.inbox.recv(self.cfg.poll_ms)
            if not messages:
                self.flush_timings()
                self.report_stats()
                self._follow_run()
                if stop_after_idle_s and time.monotonic() - idle_since > stop_after_idle_s:
                    return
            for msg in messages:
                idle_since = time.monotonic()
                if not isinstance(msg, StepMsg):
                    log.warning("%s: a %s on the control inbox; dropped", self.name, type(msg).__name__)
                elif self._accepts(msg):
                    self._step_or_rejoin(msg)

    # ---- pipeline runs ------------------------------------------------------------------------
    def join(self, newer_than: int = 0) -> None:
        """Wait for the scheduler's current run (newer than `newer_than`), form its group, start it empty."""
        while True:
            run = current_run(self.r, self.cfg.redis)
            if run is None or run.epoch <= newer_than:
                time.sleep(0.2)
                continue
            try:
                self._form(run)
            except (RendezvousAbandoned, RuntimeError, ValueError) as exc:  # a peer or the run went away
                log.warning("%s: could not join run %d (%s); retrying", self.name, run.epoch,
                            type(exc).__name__ if isinstance(exc, RendezvousAbandoned) else exc)
                self._leave(broken=True)
                newer_than = 0 if isinstance(exc, RendezvousAbandoned) else newer_than
                continue
            self._reset(run)
            mark_joined(self.r, self.cfg.redis, self.name, run.epoch)
            log.info("%s joined run %d (steps from %d)", self.name, run.epoch, run.base_step + 1)
            return

    def _form(self, run: PipelineRun) -> None:
        self._leave(broken=False)
        lc = self.cfg.link
        if lc is None:
            return
        redis_cfg = self.cfg.redis

        def still_current() -> bool:
            return current_run(self.r, redis_cfg) == run

        if lc.rank == 0:
            self.store = host_store(lc)
            publish_rendezvous(self.r, redis_cfg, run.epoch, lc.master_addr, self.store.port)
        else:
            while (address := rendezvous_address(self.r, redis_cfg, run.epoch)) is None:
                if not still_current():
                    raise RendezvousAbandoned
                time.sleep(0.1)
            self.store = join_store(lc, *address)
        wait_for_peers(self.store, lc.world, still_current)
        if lc.rank == 0:  # formed: a stage that starts later waits for the next run instead of this store
            close_rendezvous(self.r, redis_cfg, run.epoch)
        # the runner's own device and dtype: received states land where this stage computes, as it computes them
        self.link = ActivationLink(lc, self.runner.device, self.runner.dtype, self.runner.arch.hidden_size,
                                   self.store, tag=f"run{run.epoch}", still_current=still_current)

    def _leave(self, broken: bool) -> None:
        if self.link is not None:
            try:
                self.link.close(broken=broken)
            except RuntimeError as exc:
                log.warning("%s: leaving the group: %s", self.name, exc)
        self.link, self.store = None, None

    def _reset(self, run: PipelineRun) -> None:
        """A run starts with an empty pipe: every request of the run before was failed by the scheduler."""
        for rid in list(self.slots):
            self.runner.release(rid)
        self.slots, self.ids, self.finished = {}, {}, set()
        self.run_, self.step_no = run, run.base_step
        if self.cfg.rank == self.cfg.world - 1:
            self.scheduler.connect([run.control])

    def _follow_run(self) -> None:
        """Idle: join the scheduler's run when it has begun a new one (a restart, or a stage was lost)."""
        run = current_run(self.r, self.cfg.redis)
        if run is not None and run != self.run_:
            log.info("%s: run %d began (this stage is in run %d)", self.name, run.epoch, self.run_.epoch)
            self.join()

    def _accepts(self, msg: StepMsg) -> bool:
        if msg.epoch != self.run_.epoch:
            log.warning("%s: refused step %d of run %d (this stage is in run %d)", self.name, msg.step, msg.epoch,
                        self.run_.epoch)
            return False
        if msg.step != self.step_no + 1:
            log.warning("%s: step %d out of order after %d; dropped", self.name, msg.step, self.step_no)
            return False
        return True

    def _step_or_rejoin(self, msg: StepMsg) -> None:
        """Compute the step; a lost peer (the link fails) is reported, and the stage joins the next run."""
        self.step_no = msg.step
        try:
            self.step(msg)
        except LinkLost as exc:  # NCCL's errors, or no input while the run moved on
            log.error("%s: link lost at step %d of run %d: %s", self.name, msg.step, msg.epoch, exc)
            lost = StageErrorMsg(self.cfg.rank, msg.step, [], f"link lost: {exc}", link_lost=True)
            publish(self.r, self.cfg.redis.errors, lost)
            self._leave(broken=True)
            self.join(newer_than=msg.epoch)

    def step(self, msg: StepMsg) -> None:
        self._admit(msg.step, msg.admitted)
        events = msg.events
        self.runner.apply(events)
        pruned: dict[str, set[int]] = {}
        ended = [e.request_id for e in events if e.kind == "finish"]
        for e in events:
            if e.kind == "prune":
                pruned.setdefault(e.request_id, set()).update(e.node_ids)
        self.finished.update(ended)
        if self.cfg.rank == 0:
            batch = MicroBatch(msg.batch_id, msg.rows())
        else:
            first = msg.step == self.run_.base_step + 1  # nothing was sent to this stage before the run began
            batch = MicroBatch(-1, []) if first else self.link.recv(msg.step, self.ids)
        batch = batch.without(pruned, self.finished)
        start = time.monotonic()
        out = self._forward(msg.step, batch)
        self.compute_s = time.monotonic() - start
        self.timings.append(f"{msg.step}:{start:.6f}:{self.compute_s:.6f}")
        if self.cfg.rank < self.cfg.world - 1:
            self.link.send(msg.step, out, self.slots)
        else:
            verify = VerifyMsg(step=msg.step, batch_id=out.batch_id, request_ids=[r.request_id for r in out.rows],
                               node_ids=[r.node_id for r in out.rows], targets=out.targets, logprobs=out.logprobs,
                               compute_s=self.compute_s, epoch=self.run_.epoch)
            self.scheduler.send(verify)
        self._forget(ended)
        if len(self.timings) >= 64 or not batch.rows:  # off the critical path: after this step's output
            self.flush_timings()
        self.report_stats()

    def _forget(self, ended: list[str]) -> None:
        """Requests the scheduler ended in this step leave this stage's books. Their last rows are gone: the
        stage before applied the same finish in this step, so it sends none of them, and this step dropped
        what it had sent before. Kept, a long-running stage would hold every request id it ever served."""
        for rid in ended:
            slot = self.slots.pop(rid, None)
            if slot is not None and self.ids.get(slot) == rid:
                del self.ids[slot]
            self.finished.discard(rid)

    def _forward(self, step: int, batch: MicroBatch):
        """Compute. A request the runner could not compute fails alone (the runner left its rows out); a failure
        of the whole batch fails its requests and passes an empty batch on. Failed requests are reported."""
        try:
            out = self.runner.forward(batch)
        except SpecPipeError as exc:
            failed = sorted({r.request_id for r in batch.rows})
            self._failed(step, failed, str(exc))
            for rid in failed:
                self.runner.release(rid)
            return self.runner.forward(MicroBatch(batch.batch_id, []))
        for rid, why in self.runner.take_failures().items():
            self._failed(step, [rid], why)
        return out

    def _failed(self, step: int, request_ids: list[str], why: str) -> None:
        """Report requests this stage cannot compute (the scheduler ends them) and drop their rows from now on."""
        log.error("%s: step %d failed for %s: %s", self.name, step, request_ids, why)
        publish(self.r, self.cfg.redis.errors, StageErrorMsg(self.cfg.rank, step, request_ids, why))
        self.finished.update(request_ids)

    def report_stats(self) -> None:
        """The stats snapshot (KV use against the run's budget), when due; off the beat."""
        if self.run_ is not None and self.telemetry.is_due():
            self.telemetry.stats(self.runner.kv_use(self.run_.kv_slots))

    def flush_timings(self) -> None:
        if self.timings:
            key, timings, self.timings = self.cfg.redis.key("timings", self.name), self.timings, []
            self.writer.submit(lambda r: r.rpush(key, *timings))

    def _admit(self, step: int, admitted: list[AdmittedRequest]) -> None:
        """Register the step's new requests. One this stage cannot take (its grammar, its settings) fails alone:
        its link slot is still known, so the rows other stages send of it are read, then dropped."""
        for a in admitted:
            self.slots[a.request_id], self.ids[a.slot] = a.slot, a.request_id
            self.finished.discard(a.request_id)
            try:
                self.runner.add_request(a.request_id, RequestInfo(a.prompt_len, a.sampling.params()), a.capacity)
            except SpecPipeError as exc:
                self._failed(step, [a.request_id], str(exc))
