"""The distributed runtime: real Redis, real processes, 2 stage processes linked over TCP.

Every output must equal the in-process reference (plain decoding, same seed).
"""

from __future__ import annotations

import time

import msgpack
import pytest

from shared.transport.control import Outbox
from shared.transport.membership import PipelineRun, control_addresses, current_run, not_joined
from shared.transport.queue_client import collect, submit
from shared.transport.redis_io import publish, stage_name
from shared.wire.messages import CancelMsg, RequestMsg, StepMsg, VerifyMsg
from tests.cluster import Cluster
from tests.multiproc.conftest import JOBS, reference, submit_job

pytestmark = pytest.mark.multiproc

def _submit(cluster: Cluster, i: int, job) -> None:
    submit_job(cluster, f"job{i}", job)


# label: (scheduler's --draft-wait-ms, whether levels must reach the pipe)
DRAFT_WAITS = {"waits for the draft": ("1000", True), "never waits": ("0", False)}


@pytest.mark.parametrize("case", list(DRAFT_WAITS))
def test_services_speculate_with_a_draft_model(cluster_factory, tiny_dir, case) -> None:
    """A perfect draft (the target itself) on the real services: lossless either way, and when the scheduler
    waits for the level drafted while the stages computed the previous step, the drafts reach the pipe and
    are accepted, so the request takes fewer pipeline steps than pp's (T - 1) * N. The width rule is the budget
    rule, which always speculates: on tiny-random a step is a millisecond or two, the draft's round trip about as
    long, and the cost rule may rightly find PP faster (tests/scheduler/test_width.py tests that choice)."""
    wait_ms, speculates = DRAFT_WAITS[case]
    cluster = cluster_factory(policy="specpipe", draft=str(tiny_dir),
                              extra=("--draft-wait-ms", wait_ms, "--width-rule", "budget"))
    prompt, n = [5, 17, 99, 3, 5, 17, 42, 7], 24
    submit(cluster.r, cluster.cfg, RequestMsg("solo", prompt, n))
    result = collect(cluster.r, cluster.cfg, "solo", timeout_s=120)
    assert result.tokens == reference(tiny_dir, prompt, n, 0.0, 1.0, 0, 0)
    for name in cluster.procs:  # each service says what it runs as it starts (its log, not only its failures)
        assert f"{name} ready: " in cluster.log(name), cluster.log(name)
    stats = msgpack.unpackb(cluster.r.get(cluster.cfg.stats) or b"\x80")
    deadline = time.time() + 10
    while stats.get("tokens", 0) < n and time.time() < deadline:  # the snapshot is rewritten twice a second
        time.sleep(0.2)
        stats = msgpack.unpackb(cluster.r.get(cluster.cfg.stats) or b"\x80")
    if speculates:  # without the wait it depends on who wins the race: nothing to assert beyond lossless
        assert stats["accepted"] >= n // 2, stats
        assert stats["steps"] < (n - 1) * 2, stats


# label: (policy, draft, numerics, n-gram table across requests in tokens); fast numerics (the services' default)
# and compiled may differ from plain decoding only at rounding near-ties, which tiny-random's logits are far from,
# so its outputs must match here too. With a table across requests, the requests sent after the first finished
# draft from its text too.
CONCURRENT = {
    "specpipe-draft-model": ("specpipe", "model", "exact", 0),
    "specpipe-ngram": ("specpipe", "ngram", "exact", 0),
    "pp": ("pp", "ngram", "exact", 0),
    "specpipe-draft-model, fast numerics": ("specpipe", "model", "fast", 0),
    "specpipe-ngram, compiled numerics": ("specpipe", "ngram", "compiled", 0),
    "specpipe-ngram, a table across requests": ("specpipe", "ngram", "exact", 4096),
}


@pytest.mark.parametrize("case", list(CONCURRENT))
def test_concurrent_requests_match_in_processreference(cluster_factory, tiny_dir, case) -> None:
    policy, draft, numerics, shared = CONCURRENT[case]
    cluster = cluster_factory(policy=policy, draft=str(tiny_dir) if draft == "model" else "ngram", numerics=numerics,
                              ngram_shared=shared)
    for i, job in enumerate(JOBS[:3]):
        _submit(cluster, i, job)
    first = collect(cluster.r, cluster.cfg, "job0", timeout_s=120)  # later requests arrive while others decode
    for i, job in enumerate(JOBS[3:], start=3):
        _submit(cluster, i, job)
    results = [first] + [collect(cluster.r, cluster.cfg, f"job{i}", timeout_s=120) for i in range(1, len(JOBS))]
    for i, (job, result) in enumerate(zip(JOBS, results)):
        assert result.finished and result.error is None, (i, result, cluster.log("scheduler")[-2000:])
        assert result.tokens == reference(tiny_dir, *job), f"request {i} differs from the reference"


def test_killed_draft_worker_keeps_outputs_identical(cluster_factory, tiny_dir) -> None:
    cluster = cluster_factory(draft=str(tiny_dir))
    jobs = [(JOBS[0][0], 40, 0.0, 1.0, 0, 0), (JOBS[1][0], 40, 0.8, 0.9, 50, 7)]
    for i, job in enumerate(jobs):
        _submit(cluster, i, job)
    deadline = time.monotonic() + 60
    while not cluster.r.exists(cluster.cfg.out("job0")) and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster.kill("draft-0")  # mid-generation
    results = [collect(cluster.r, cluster.cfg, f"job{i}", timeout_s=120) for i in range(len(jobs))]
    for job, result in zip(jobs, results):
        assert result.finished and result.error is None
        assert result.tokens == reference(tiny_dir, *job)
    assert cluster.running()["scheduler"] and cluster.running()["stage-0"] and cluster.running()["stage-1"]


def test_malformed_messages_on_every_stream_and_inbox_are_dropped(cluster_factory, tiny_dir) -> None:
    cluster = cluster_factory(draft="ngram")
    cfg, r = cluster.cfg, cluster.r
    garbage = [b"\xc1\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "type": "request", "request_id": 5}),
               msgpack.packb({"v": 999, "type": "step"}), b""]
    for stream in (cfg.requests, cfg.draft_events, cfg.draft_jobs, cfg.errors, cfg.cancel):
        for raw in garbage:
            r.xadd(stream, {"m": raw})
        r.xadd(stream, {"not-m": b"x"})
    run = _wait_formed(cluster)
    inboxes = Outbox([run.control, *control_addresses(r, cfg, [stage_name(k) for k in range(cluster.stages)])])
    for raw in garbage:
        inboxes.send_raw(raw)
    inboxes.send(StepMsg(step=10_000, batch_id=1, events=[["x", "prune", [1]]], epoch=run.epoch))  # out of order
    inboxes.send(VerifyMsg(step=10_000, batch_id=1, request_ids=["x"], node_ids=[1], targets=[2], epoch=run.epoch))
    inboxes.send(CancelMsg(request_id="job0"))  # a valid message of the wrong kind: dropped, not acted on
    _submit(cluster, 0, JOBS[0])
    result = collect(r, cfg, "job0", timeout_s=120)
    inboxes.close()
    assert result.finished and result.tokens == reference(tiny_dir, *JOBS[0])
    assert all(cluster.running().values()), cluster.running()


def _wait_formed(cluster: Cluster, timeout_s: float = 60) -> PipelineRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = current_run(cluster.r, cluster.cfg)
        if run is not None and not not_joined(cluster.r, cluster.cfg, cluster.stages, run.epoch):
            return run
        time.sleep(0.1)
    raise TimeoutError("the pipeline did not form: " + cluster.log("scheduler")[-1500:])


@pytest.mark.parametrize(
    "prompt,n,message",
    [([1] * 3000, 8, "exceeds the model's context"), ([], 8, "empty prompt"), ([5, 6], 0, "max_new_tokens")],
    ids=["prompt-too-long", "empty-prompt", "zero-new-tokens"],
)
def test_bad_request_gets_clear_error(cluster_factory, prompt, n, message) -> None:
    cluster = cluster_factory(policy="pp")
    submit(cluster.r, cluster.cfg, RequestMsg("bad", prompt, n))
    result = collect(cluster.r, cluster.cfg, "bad", timeout_s=60)
    assert result.finished and result.finish_reason == "error" and message in result.error
    assert all(cluster.running().values())


def test_lost_stage_fails_requests_instead_of_hanging(cluster_factory) -> None:
    cluster = cluster_factory(policy="pp")
    submit(cluster.r, cluster.cfg, RequestMsg("long", [5, 6, 7], 1500))
    deadline = time.monotonic() + 60
    while not cluster.r.exists(cluster.cfg.out("long")) and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster.kill("stage-1")
    result = collect(cluster.r, cluster.cfg, "long", timeout_s=60)
    assert result.finished and result.finish_reason == "error" and "stage" in result.error
    assert cluster.running()["scheduler"]


def test_admission_waits_for_kv_and_queue_limit_refuses(cluster_factory, tiny_dir) -> None:
    # room for one request's KV at a time, one more may wait: the rest are refused ("queue full")
    cluster = cluster_factory(policy="pp", extra=("--kv-slots", "60", "--max-queue", "1"))
    jobs = [(JOBS[0][0], 30, 0.0, 1.0, 0, 0)] * 4
    for i, job in enumerate(jobs):
        _submit(cluster, i, job)
    results = [collect(cluster.r, cluster.cfg, f"job{i}", timeout_s=120) for i in range(len(jobs))]
    served = [r for r in results if r.error is None]
    refused = [r for r in results if r.finish_reason == "queue_full"]
    assert len(served) == 2 and len(refused) == 2, results
    for result in served:
        assert result.tokens == reference(tiny_dir, *jobs[0])


def test_killed_one_of_two_draft_workers_leaves_no_job_behind(cluster_factory, tiny_dir) -> None:
    cluster = cluster_factory(draft=str(tiny_dir), drafts=2)
    jobs = [(JOBS[4][0], 40, 1.0, 0.95, 20, 99), (JOBS[0][0], 40, 0.0, 1.0, 0, 0)]
    for i, job in enumerate(jobs):
        _submit(cluster, i, job)
    time.sleep(1.0)
    cluster.kill("draft-1")
    results = [collect(cluster.r, cluster.cfg, f"job{i}", timeout_s=120) for i in range(len(jobs))]
    for job, result in zip(jobs, results):
        assert result.finished and result.error is None
        assert result.tokens == reference(tiny_dir, *job)
    deadline = time.monotonic() + 30  # the survivor claims whatever the dead worker had taken
    while time.monotonic() < deadline:
        pending = cluster.r.xpending_range(cluster.cfg.draft_jobs, "drafts", "-", "+", 100, consumername="draft-1")
        if not pending:
            break
        time.sleep(0.5)
    assert not pending


def test_cancel_frees_a_running_request(cluster_factory, tiny_dir) -> None:
    from shared.wire.messages import CancelMsg

    cluster = cluster_factory(draft="ngram")
    submit(cluster.r, cluster.cfg, RequestMsg("long", [5, 6, 7], 1500))
    deadline = time.monotonic() + 60
    while not cluster.r.exists(cluster.cfg.out("long")) and time.monotonic() < deadline:
        time.sleep(0.05)
    publish(cluster.r, cluster.cfg.cancel, CancelMsg("long"))
    result = collect(cluster.r, cluster.cfg, "long", timeout_s=30)
    assert result.finished and result.finish_reason == "cancelled" and len(result.tokens) < 1500
    _submit(cluster, 0, JOBS[0])  # the pipeline goes on serving
    after = collect(cluster.r, cluster.cfg, "job0", timeout_s=60)
    assert after.tokens == reference(tiny_dir, *JOBS[0])


def test_per_request_policy_override(cluster_factory, tiny_dir) -> None:
    cluster = cluster_factory(policy="pp", draft="ngram")  # the server's default is plain pp
    cluster.add_draft_worker("draft-0")  # speculation for the requests that ask for it
    overrides = [("specpipe", 3), ("tree", 2), ("pp", None)]
    for i, (policy, width) in enumerate(overrides):
        submit(cluster.r, cluster.cfg, RequestMsg(f"o{i}", JOBS[0][0], 12, policy=policy, width=width))
    submit(cluster.r, cluster.cfg, RequestMsg("bad", JOBS[0][0], 12, policy="warp-drive"))
    for i in range(len(overrides)):
        result = collect(cluster.r, cluster.cfg, f"o{i}", timeout_s=120)
        assert result.tokens == reference(tiny_dir, JOBS[0][0], 12, 0.0, 1.0, 0, 0)
    bad = collect(cluster.r, cluster.cfg, "bad", timeout_s=60)
    assert bad.finish_reason == "error" and "unknown policy" in bad.error
