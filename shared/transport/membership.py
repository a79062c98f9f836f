"""Which pipeline run a cluster is in: the run (epoch) record, the stages' rendezvous, who has joined.

Every start of a scheduler, and every re-forming of the pipeline after a lost
stage, begins a new *run*: a number that only grows (`{prefix}:epoch`, INCR).
The current run is the hash `{prefix}:pipeline`:

    epoch       the run's number; every StepMsg and expansion job carries it
    base_step   the scheduler's step count when the run began: its first StepMsg is base_step + 1
    control     the scheduler's control inbox (shared/transport/control.py): where the last stage sends its
                VerifyMsg and the drafts their proposals
    kv_slots    the KV slots each stage may hold (the scheduler's admission budget): stages report their KV use
                against it

A stage joins a run by forming the torch.distributed group of that run: stage 0
hosts the group's store on a port it picks (or the fixed --master-port) and
publishes "host:port" under `{prefix}:rdzv:{epoch}` until every stage has
arrived; the other stages read it there, so a restart never waits for a port
held by the previous run, and a stage that starts after the group formed waits
for the next run. Once in
the group, a stage writes the run's epoch under `{prefix}:joined:{stage}`; its control inbox (where the
scheduler sends it each StepMsg) is under `{prefix}:control:{stage}`, written before it joins. The
scheduler steps a run only when every stage is alive and has joined it, so no
stage ever sees a step of a run it has not joined; a step of another run is
refused (logged) by whoever reads it. Messages of older runs are trimmed from
the per-step streams when a scheduler starts.

Only Redis here: the torch.distributed side is stage_worker's.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shared.transport.redis_io import RedisConfig, not_alive, stage_name

RENDEZVOUS_TTL_S = 24 * 3600  # a run's rendezvous address outlives any run; stale ones expire


@dataclass(frozen=True)
class PipelineRun:
    epoch: int
    base_step: int  # the run's first StepMsg is base_step + 1
    control: str = ""  # the scheduler's control inbox, "tcp://host:port"
    kv_slots: int = 0  # KV slots per stage the scheduler admits requests into (0: not known)


def begin_run(r: redis.Redis, cfg: RedisConfig, base_step: int, control: str, kv_slots: int = 0) -> PipelineRun:
    """A new run: the next epoch, made current at once."""
    run = PipelineRun(int(r.incr(cfg.epoch)), base_step, control, kv_slots)
    r.hset(cfg.pipeline, mapping={"epoch": run.epoch, "base_step": run.base_step, "control": control,
                                  "kv_slots": kv_slots})
    return run


def current_run(r: redis.Redis, cfg: RedisConfig) -> PipelineRun | None:
    fields = r.hgetall(cfg.pipeline)
    try:
        return PipelineRun(int(fields[b"epoch"]), int(fields[b"base_step"]), fields.get(b"control", b"").decode(),
                           int(fields.get(b"kv_slots", 0)))
    except (KeyError, ValueError):
        return None


def end_run(r: redis.Redis, cfg: RedisConfig, run: PipelineRun) -> None:
    """A scheduler stopping cleanly: its run is no longer current (stages wait for the next one)."""
    if current_run(r, cfg) == run:
        r.delete(cfg.pipeline)


def per_run_streams(cfg: RedisConfig) -> tuple[str, ...]:
    """Streams whose messages belong to one run (the queue, cancels and outputs are not among them)."""
    return cfg.steps, cfg.draft_jobs, cfg.errors


def trim_old_runs(r: redis.Redis, cfg: RedisConfig) -> int:
    """Empty the per-run streams, keeping them and their consumer groups; returns the entries removed."""
    return sum(int(r.xtrim(stream, maxlen=0, approximate=False)) for stream in per_run_streams(cfg))


def publish_rendezvous(r: redis.Redis, cfg: RedisConfig, epoch: int, host: str, port: int) -> None:
    r.set(cfg.rendezvous(epoch), f"{host}:{port}", ex=RENDEZVOUS_TTL_S)


def rendezvous_address(r: redis.Redis, cfg: RedisConfig, epoch: int) -> tuple[str, int] | None:
    raw = r.get(cfg.rendezvous(epoch))
    if raw is None:
        return None
    host, _, port = raw.decode().rpartition(":")
    return host, int(port)


def close_rendezvous(r: redis.Redis, cfg: RedisConfig, epoch: int) -> None:
    """Every stage is in the run's group: nobody else may try to join it."""
    r.delete(cfg.rendezvous(epoch))


def publish_control(r: redis.Redis, cfg: RedisConfig, component: str, address: str) -> None:
    """Where `component`'s control inbox is (written before it joins a run, so the run's scheduler finds it)."""
    r.set(cfg.control(component), address)


def control_addresses(r: redis.Redis, cfg: RedisConfig, components: list[str]) -> list[str]:
    """The components' control inboxes, in order ("" where none is known)."""
    return [(a or b"").decode() for a in r.mget([cfg.control(c) for c in components])]


def mark_joined(r: redis.Redis, cfg: RedisConfig, component: str, epoch: int) -> None:
    r.set(cfg.joined(component), epoch)


def not_joined(r: redis.Redis, cfg: RedisConfig, stages: int, epoch: int) -> list[str]:
    """Stages that are not (yet) serving run `epoch`: not alive, or still in another run."""
    names = [stage_name(k) for k in range(stages)]
    joined, lost = r.mget([cfg.joined(n) for n in names]), set(not_alive(r, cfg, names))
    return [n for n, e in zip(names, joined) if e is None or int(e) != epoch or n in lost]
