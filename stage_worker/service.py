"""`python -m stage_worker --rank k --world N`: one pipeline stage as a process.

Per step t (lockstep with the scheduler):
  1. read StepMsg t from Redis: register admitted requests, apply prune/commit/finish,
  2. take the input: stage 0 from the StepMsg rows, stage k > 0 from stage k-1 (step t-1),
     minus every row pruned or finished by now,
  3. compute this stage's layers,
  4. send the output to stage k+1, or (last stage) publish the target tokens as VerifyMsg.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from shared.batch import MicroBatch, PipelineEvent, Row
from shared.config import AttentionConfig, SamplingParams
from shared.errors import SpecPipeError
from shared.messages import StageErrorMsg, StepMsg, VerifyMsg
from shared.redis_io import RedisConfig, connect, decode_or_log, publish, read, stage_name, start_heartbeat
from stage_worker.link import COMMITTED, NEEDS_TARGET, ActivationLink
from stage_worker.runner import RequestInfo, StageRunner

log = logging.getLogger("stage_worker")


@dataclass(frozen=True)
class StageServiceConfig:
    rank: int
    world: int
    redis: RedisConfig
    poll_ms: int = 1000  # XREAD block per poll; heartbeats are refreshed between polls


def events_of(msg: StepMsg) -> list[PipelineEvent]:
    out = []
    for item in msg.events:
        if isinstance(item, list) and len(item) == 3 and isinstance(item[2], list):
            out.append(PipelineEvent(str(item[0]), str(item[1]), tuple(int(n) for n in item[2])))
    return out


def stage0_batch(msg: StepMsg) -> MicroBatch:
    rows = [
        Row(rid, node, parent, pos, tok, bool(f & COMMITTED), bool(f & NEEDS_TARGET))
        for rid, node, parent, pos, tok, f in zip(
            msg.request_ids, msg.node_ids, msg.parent_ids, msg.positions, msg.tokens, msg.flags
        )
    ]
    return MicroBatch(msg.batch_id, rows)


class StageService:
    def __init__(self, cfg: StageServiceConfig, runner: StageRunner, link: ActivationLink | None):
        self.cfg, self.runner, self.link = cfg, runner, link
        self.r = connect(cfg.redis)
        self.slots: dict[str, int] = {}  # request id -> slot in link headers
        self.ids: dict[int, str] = {}
        self.finished: set[str] = set()
        self.name = stage_name(cfg.rank)
        self.compute_s = 0.0
        # "step:start:compute_s" (time.monotonic(), one clock for every process on a host), flushed to Redis in
        # batches: benchmarks.wire_overhead's split of a step
        self.timings: list[str] = []

    def run(self, stop_after_idle_s: float | None = None) -> None:
        last_id, step, idle_since = "0", 0, time.monotonic()
        start_heartbeat(self.cfg.redis, self.name)
        w = self.runner.weights
        log.info("%s ready: layers %d-%d of %d (%s), torch %d threads, link %s", self.name, w.start, w.end - 1,
                 self.runner.arch.num_layers, self.runner.dtype, torch.get_num_threads(),
                 "none" if self.link is None else self.link.device)
        while True:
            entries = read(self.r, self.cfg.redis.steps, last_id, self.cfg.poll_ms)
            if not entries:
                self.flush_timings()
            if not entries and stop_after_idle_s and time.monotonic() - idle_since > stop_after_idle_s:
                return
            for entry_id, raw in entries:
                last_id, idle_since = entry_id, time.monotonic()
                msg = decode_or_log(raw, StepMsg, self.name)
                if msg is None or msg.step != step + 1:
                    if msg is not None:
                        log.warning("%s: step %d out of order after %d; dropped", self.name, msg.step, step)
                    continue
                step = msg.step
                self.step(msg)

    def step(self, msg: StepMsg) -> None:
        self._admit(msg.admitted)
        events = events_of(msg)
        self.runner.apply(events)
        pruned: dict[str, set[int]] = {}
        for e in events:
            if e.kind == "prune":
                pruned.setdefault(e.request_id, set()).update(e.node_ids)
            elif e.kind == "finish":
                self.finished.add(e.request_id)
        if self.cfg.rank == 0:
            batch = stage0_batch(msg)
        else:
            batch = self.link.recv(msg.step, self.ids) if msg.step > 1 else MicroBatch(-1, [])
        batch = batch.without(pruned, self.finished)
        start = time.monotonic()
        out = self._forward(msg.step, batch)
        self.compute_s = time.monotonic() - start
        self.timings.append(f"{msg.step}:{start:.6f}:{self.compute_s:.6f}")
        if self.cfg.rank < self.cfg.world - 1:
            self.link.send(msg.step, out, self.slots)
        else:
            verify = VerifyMsg(
                msg.step, out.batch_id, [r.request_id for r in out.rows], [r.node_id for r in out.rows],
                out.targets, self.compute_s,
            )
            publish(self.r, self.cfg.redis.verify, verify)
        if len(self.timings) >= 64 or not batch.rows:  # off the critical path: after this step's output
            self.flush_timings()

    def _forward(self, step: int, batch: MicroBatch):
        """Compute; on a request-level failure report the requests and pass an empty batch on."""
        try:
            return self.runner.forward(batch)
        except SpecPipeError as exc:
            failed = sorted({r.request_id for r in batch.rows})
            log.error("%s: step %d failed for %s: %s", self.name, step, failed, exc)
            publish(self.r, self.cfg.redis.errors, StageErrorMsg(self.cfg.rank, step, failed, str(exc)))
            for rid in failed:
                self.runner.release(rid)
                self.finished.add(rid)
            return self.runner.forward(MicroBatch(batch.batch_id, []))

    def flush_timings(self) -> None:
        if self.timings:
            self.r.rpush(self.cfg.redis.key("timings", self.name), *self.timings)
            self.timings = []

    def _admit(self, admitted: list[dict]) -> None:
        for item in admitted:
            try:
                rid, slot = str(item["request_id"]), int(item["slot"])
                sampling = SamplingParams(float(item["temperature"]), float(item["top_p"]), int(item["top_k"]), int(item["seed"]))
                info = RequestInfo(int(item["prompt_len"]), sampling)
                self.runner.add_request(rid, info, int(item["capacity"]))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: bad admitted record %r: %s", self.name, item, exc)
                continue
            self.slots[rid], self.ids[slot] = slot, rid
            self.finished.discard(rid)


def build_runner(
    model_dir, arch, rank: int, world: int, dtype: torch.dtype, attention: AttentionConfig = AttentionConfig()
) -> StageRunner:
    from shared.config import split_layers
    from stage_worker.weights import load_stage_weights

    attention.check_head_dim(arch.head_dim)  # before any weights are read
    start, end = split_layers(arch.num_layers, world)[rank]
    return StageRunner(arch, load_stage_weights(model_dir, arch, start, end, dtype), attention)
