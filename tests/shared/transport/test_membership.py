"""Pipeline runs in Redis (shared/transport/membership.py): epochs only grow, the current run, trimming what older runs
left, the rendezvous address, and who has joined which run."""

from __future__ import annotations

import uuid

import pytest

from shared.transport.membership import (
    PipelineRun,
    begin_run,
    close_rendezvous,
    current_run,
    end_run,
    mark_joined,
    not_joined,
    publish_rendezvous,
    rendezvous_address,
    trim_old_runs,
)
from shared.transport.redis_io import RedisConfig, beat, connect, ensure_group
from specpipe.cluster import delete_keys

pytestmark = pytest.mark.unit


@pytest.fixture
def redis_cfg():
    cfg = RedisConfig(prefix=f"test-runs-{uuid.uuid4().hex[:8]}")
    r = connect(cfg)
    yield r, cfg
    delete_keys(r, cfg.prefix)


def test_each_run_gets_a_new_epoch_and_becomes_current(redis_cfg) -> None:
    r, cfg = redis_cfg
    assert current_run(r, cfg) is None
    first = begin_run(r, cfg, base_step=0, control="tcp://127.0.0.1:5001")
    second = begin_run(r, cfg, base_step=57, control="tcp://127.0.0.1:5002", kv_slots=4096)
    assert second == PipelineRun(first.epoch + 1, 57, "tcp://127.0.0.1:5002", 4096) == current_run(r, cfg)
    assert first.kv_slots == 0  # not given: not known (stages then report no KV use)
    end_run(r, cfg, first)  # not current: nothing happens
    assert current_run(r, cfg) == second
    end_run(r, cfg, second)
    assert current_run(r, cfg) is None


def test_trim_empties_per_run_streams_but_keeps_groups_and_the_queue(redis_cfg) -> None:
    r, cfg = redis_cfg
    ensure_group(r, cfg.draft_jobs, "drafts", "$")
    for stream in (cfg.steps, cfg.errors, cfg.draft_jobs, cfg.requests):
        for _ in range(5):
            r.xadd(stream, {"m": b"x"})
    assert trim_old_runs(r, cfg) == 15
    assert r.xlen(cfg.steps) == r.xlen(cfg.errors) == r.xlen(cfg.draft_jobs) == 0
    assert r.xlen(cfg.requests) == 5  # queued requests belong to no run: never trimmed
    assert r.xinfo_groups(cfg.draft_jobs)[0]["name"] == b"drafts"


def test_rendezvous_address_is_per_run(redis_cfg) -> None:
    r, cfg = redis_cfg
    publish_rendezvous(r, cfg, 3, "10.0.0.7", 41234)
    assert rendezvous_address(r, cfg, 3) == ("10.0.0.7", 41234)
    assert rendezvous_address(r, cfg, 4) is None
    close_rendezvous(r, cfg, 3)  # formed: a stage starting later must wait for the next run
    assert rendezvous_address(r, cfg, 3) is None


# label: (stages alive, the epoch each stage joined) -> stages not serving run 2
JOINS = {
    "all joined": ([0, 1], [2, 2], []),
    "one still in the run before": ([0, 1], [2, 1], ["stage-1"]),
    "one never joined": ([0, 1], [2, None], ["stage-1"]),
    "joined but its heartbeat stopped": ([1], [2, 2], ["stage-0"]),
}


@pytest.mark.parametrize("case", list(JOINS))
def test_not_joined(redis_cfg, case) -> None:
    r, cfg = redis_cfg
    live, joined, expected = JOINS[case]
    for k in live:
        beat(r, cfg, f"stage-{k}")
    for k, epoch in enumerate(joined):
        if epoch is not None:
            mark_joined(r, cfg, f"stage-{k}", epoch)
    assert not_joined(r, cfg, 2, 2) == expected
