"""Pipeline runs (shared/transport/membership.py) on real processes: restarts on a used Redis, two clusters on one
Redis, a lost stage that fails only the in-flight requests and a pipeline that re-forms once it is back, a scheduler
restart that loses no queued request. Every output is checked against plain decoding."""

from __future__ import annotations

import time

import pytest

from shared.transport.membership import current_run, not_joined
from shared.transport.queue_client import collect, submit
from shared.transport.redis_io import publish
from shared.wire.messages import RequestMsg, StepMsg
from tests.cluster import Cluster
from tests.multiproc.conftest import JOBS, reference, submit_job

pytestmark = pytest.mark.multiproc


def _serves(cluster: Cluster, tiny_dir, request_id: str, job=JOBS[0]) -> None:
    submit_job(cluster, request_id, job)
    result = collect(cluster.r, cluster.cfg, request_id, timeout_s=120)
    assert result.finished and result.error is None, (result, cluster.log("scheduler")[-2000:])
    assert result.tokens == reference(tiny_dir, *job)


def _wait_formed(cluster: Cluster, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = current_run(cluster.r, cluster.cfg)
        if run is not None and not not_joined(cluster.r, cluster.cfg, cluster.stages, run.epoch):
            return run.epoch
        time.sleep(0.1)
    raise TimeoutError("the pipeline did not re-form: " + cluster.log("scheduler")[-1500:])


def _wait_output(cluster: Cluster, request_id: str) -> None:
    deadline = time.monotonic() + 60
    while not cluster.r.exists(cluster.cfg.out(request_id)) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_restart_on_a_used_prefix_serves(cluster_factory, tiny_dir, tmp_path) -> None:
    first = cluster_factory(policy="specpipe")
    _serves(first, tiny_dir, "before")
    prefix = first.cfg.prefix
    for step in range(1, 2001):  # what a long-lived Redis holds: thousands of steps of runs long gone
        publish(first.r, first.cfg.steps, StepMsg(step=step, batch_id=step, events=[], epoch=1))
    first.close(keep_keys=True)
    seen = {name: len(first.log(name)) for name in ("stage-0", "stage-1")}  # the logs go on in the same files
    again = cluster_factory(policy="specpipe", prefix=prefix)
    _serves(again, tiny_dir, "after", JOBS[1])
    for name, offset in seen.items():
        new = again.log(name)[offset:]
        assert "joined run" in new and "out of order" not in new and "refused" not in new, new[-1500:]
    assert again.r.xlen(again.cfg.steps) < 100  # the old runs' steps were trimmed


def test_two_clusters_share_one_redis(cluster_factory, tiny_dir) -> None:
    a, b = cluster_factory(policy="pp"), cluster_factory(policy="specpipe")
    for i, cluster in enumerate((a, b)):
        submit_job(cluster, "same-id", JOBS[i])
    for i, cluster in enumerate((a, b)):
        result = collect(cluster.r, cluster.cfg, "same-id", timeout_s=120)
        assert result.tokens == reference(tiny_dir, *JOBS[i]), cluster.log("scheduler")[-1500:]


@pytest.mark.parametrize("lost", ["stage-0", "stage-1"])
def test_lost_stage_fails_only_in_flight_requests_then_the_pipeline_reforms(cluster_factory, tiny_dir, lost) -> None:
    cluster = cluster_factory(policy="pp")
    epoch = _wait_formed(cluster)
    submit(cluster.r, cluster.cfg, RequestMsg("long", [5, 6, 7], 1500))
    _wait_output(cluster, "long")
    cluster.kill(lost)
    result = collect(cluster.r, cluster.cfg, "long", timeout_s=60)
    assert result.finished and result.finish_reason == "error", result
    assert f"pipeline stage {lost[-1]} is not running" in result.error, result.error
    survivor = "stage-1" if lost == "stage-0" else "stage-0"
    assert cluster.running()["scheduler"] and cluster.running()[survivor], cluster.log(survivor)[-2000:]
    cluster.restart(lost)
    assert _wait_formed(cluster) > epoch
    _serves(cluster, tiny_dir, "after")
    assert cluster.running()[survivor]  # the same process, never restarted


def test_scheduler_restart_loses_no_queued_request(cluster_factory, tiny_dir) -> None:
    cluster = cluster_factory(policy="specpipe")
    epoch = _wait_formed(cluster)
    cluster.kill("scheduler")
    submit_job(cluster, "queued", JOBS[1], arrival=time.time())  # no scheduler runs: it waits in the queue
    cluster.restart("scheduler")
    result = collect(cluster.r, cluster.cfg, "queued", timeout_s=120)
    assert result.tokens == reference(tiny_dir, *JOBS[1]), cluster.log("scheduler")[-2000:]
    assert _wait_formed(cluster) > epoch
    assert all(cluster.running().values())
