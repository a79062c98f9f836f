"""Batch jobs on Celery against a real cluster, gateway and `python -m gateway.batches.worker` (tiny-random).

A batch's results equal the HTTP endpoint's answers for the same bodies (greedy and
seeded sampling) and its usage sums theirs; a worker SIGKILLed mid-batch leaves it resumable
by a new worker, with every custom_id answered once and every request published once; a bad
line fails alone (the error file names it) while the others run.
"""

from __future__ import annotations

import collections
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shared.wire.messages import RequestMsg, decode
from tests.cluster import Cluster
from tests.gateway.batches.helpers import BatchWorker, create_batch, jsonl, output_lines, upload, wait_batch
from tests.gateway.conftest import MODEL_NAME, Gateway

pytestmark = pytest.mark.multiproc
CHAT = "/v1/chat/completions"
PROMPTS = ["Tell me about pipelines.", "Write a haiku about Redis.", "Count to five."]


def _chat_row(i: int, content: str, **sampling) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **sampling}
    return {"custom_id": f"req-{i}", "method": "POST", "url": CHAT, "body": body}


@pytest.fixture(scope="module")
def jobs_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def cluster(jobs_tmp, tiny_dir):
    """This module's own cluster, one torch thread per process: the session cluster's stages (a thread per
    core each) oversubscribe a 2-core host so badly under this module's concurrent load that steps outlast
    the 5 s heartbeat and the scheduler fails requests; the batch runner would retry, the HTTP side not."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        c = Cluster(jobs_tmp, str(tiny_dir), stages=2, policy="specpipe", draft="ngram")
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(jobs_tmp, tiny_dir, cluster):
    g = Gateway(jobs_tmp, tiny_dir, cluster.cfg.prefix, name="jobs")
    with httpx.Client(base_url=g.url, timeout=120) as c:
        yield c
    g.close()


@pytest.fixture(scope="module")
def worker(jobs_tmp, tiny_dir, cluster):
    w = BatchWorker(jobs_tmp, tiny_dir, cluster.cfg.prefix, "--inflight", "4", "--lease-ttl", "3")
    w.start()
    yield w
    w.close()


def _published(cluster, batch_id: str) -> collections.Counter:
    """How often each request id of this batch was published to the requests stream."""
    ids = (decode(fields[b"m"], RequestMsg).request_id for _, fields in cluster.r.xrange(cluster.cfg.requests))
    return collections.Counter(rid for rid in ids if batch_id in rid)


def test_batch_results_equal_the_http_endpoint(client, worker, cluster) -> None:
    rows = [_chat_row(i, p, temperature=0) for i, p in enumerate(PROMPTS)]
    rows += [_chat_row(3 + i, p, temperature=0.8, seed=7 + i) for i, p in enumerate(PROMPTS)]
    rows.append({**_chat_row(6, "hi"), "body": {**_chat_row(6, "hi")["body"], "model": "not-served"}})
    batch = create_batch(client, rows)
    assert batch["status"] in ("validating", "in_progress") and batch["request_counts"]["total"] == 7
    with ThreadPoolExecutor(2) as pool:  # the same bodies over HTTP, while the batch runs
        direct = list(pool.map(lambda row: client.post(CHAT, json=row["body"]), rows[:6]))
    done = wait_batch(client, batch["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
    assert done["completed_at"] >= done["in_progress_at"] >= done["created_at"]
    results = output_lines(client, done["output_file_id"])
    assert [r["custom_id"] for r in results] == [r["custom_id"] for r in rows]  # input order, each once
    for row, http, result in zip(rows, direct, results):
        assert http.status_code == 200 and result["response"]["status_code"] == 200 and result["error"] is None
        got, want = result["response"]["body"], http.json()
        assert got["choices"] == want["choices"] and got["usage"] == want["usage"], row
        assert got["object"] == "chat.completion" and got["id"] == result["response"]["request_id"]
    bad = results[6]["response"]
    assert bad["status_code"] == 404 and bad["body"]["error"]["code"] == "model_not_found"
    assert results[6]["error"]["code"] == "model_not_found" and results[6]["error"]["message"]
    assert [r["custom_id"] for r in output_lines(client, done["error_file_id"])] == ["req-6"]
    usage = done["usage"]
    assert usage["input_tokens"] == sum(h.json()["usage"]["prompt_tokens"] for h in direct) > 0
    assert usage["output_tokens"] == sum(h.json()["usage"]["completion_tokens"] for h in direct) > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert set(_published(cluster, batch["id"]).values()) == {1}  # the 404 line never reached the queue
    listed = client.get("/v1/batches", params={"limit": 5}).json()
    assert batch["id"] in [b["id"] for b in listed["data"]]


def test_worker_killed_mid_batch_resumes_without_repeats(client, worker, cluster) -> None:
    rows = [_chat_row(i, f"{PROMPTS[i % 3]} ({i})", temperature=0) for i in range(10)]
    for row in rows:
        row["body"]["max_tokens"] = 32  # long enough that the kill lands mid-batch
    batch = create_batch(client, rows)
    at_kill = wait_batch(client, batch["id"], until=lambda b: b["request_counts"]["completed"] >= 2)
    worker.kill()
    assert at_kill["request_counts"]["completed"] < 10
    worker.start()
    done = wait_batch(client, batch["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    results = output_lines(client, done["output_file_id"])
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows) and len(set(ids)) == 10  # each exactly once
    assert all(r["response"]["status_code"] == 200 for r in results)
    published = _published(cluster, batch["id"])
    assert set(published.values()) == {1}  # no request id published twice, across the kill
    assert {rid.split("-")[2] for rid in published} == {str(i) for i in range(10)}  # (a retry after a 503 is
    assert {r["response"]["request_id"] for r in results} <= set(published)         # a new id: -{attempt})
    resumed = [line for line in worker.log().splitlines() if f"batch {batch['id']}:" in line and "to run" in line]
    assert resumed and not resumed[0].split(f"batch {batch['id']}: ")[1].startswith("10 of")


def test_cancel_a_batch(client, worker) -> None:
    rows = [_chat_row(i, "go on", temperature=0) for i in range(8)]
    for row in rows:
        row["body"]["max_tokens"] = 400
    batch = create_batch(client, rows)
    wait_batch(client, batch["id"], until=lambda b: b["status"] == "in_progress")
    cancel = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancel.status_code == 200 and cancel.json()["status"] in ("cancelling", "cancelled")
    done = wait_batch(client, batch["id"], timeout=30)
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    assert done["request_counts"]["completed"] < 8


def test_bad_lines_fail_alone_and_go_to_the_error_file(client, worker) -> None:
    good = [_chat_row(0, "hi", temperature=0), _chat_row(6, "bye", temperature=0)]
    bad = [
        "not json",
        json.dumps({**_chat_row(2, "x"), "url": "/v1/completions"}),  # not the batch's endpoint
        json.dumps({**_chat_row(3, "x"), "body": {**_chat_row(3, "x")["body"], "stream": True}}),
        json.dumps({**_chat_row(4, "x"), "body": {"messages": [{"role": "", "content": "x"}]}}),
        json.dumps(_chat_row(0, "again")),  # a duplicate custom_id
    ]
    data = "\n".join([json.dumps(good[0]), *bad, json.dumps(good[1])]).encode()
    f = upload(client, data)
    assert f.status_code == 200, f.text  # nothing in it is refused at upload
    b = client.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": CHAT,
                                         "completion_window": "24h"})
    assert b.status_code == 200 and b.json()["request_counts"]["failed"] == 3  # the envelope errors, at once
    done = wait_batch(client, b.json()["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 7, "completed": 2, "failed": 5}
    results = output_lines(client, done["output_file_id"])
    assert [r["custom_id"] for r in results] == ["req-0", None, "req-2", "req-3", "req-4", "req-0", "req-6"]
    errors = output_lines(client, done["error_file_id"])
    assert [(r["custom_id"], r["response"] and r["response"]["status_code"]) for r in errors] == [
        (None, None), ("req-2", None), ("req-3", 400), ("req-4", 400), ("req-0", None)]
    assert all(set(r["error"]) == {"code", "message"} and r["error"]["message"] for r in errors)
    assert errors[0]["error"] == {"code": "invalid_batch_line", "message": "line 2: not valid JSON (Expecting value)"}
    assert errors[3]["response"]["body"]["error"]["param"] == "messages.0.role"
    answered = [r["response"]["body"]["usage"] for r in results if r["error"] is None]
    assert done["usage"]["input_tokens"] == sum(u["prompt_tokens"] for u in answered)


def test_files_and_batch_errors(client) -> None:
    data = jsonl([{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}])
    f = upload(client, data).json()
    assert f["object"] == "file" and f["bytes"] == len(data) and f["purpose"] == "batch"
    assert client.get(f"/v1/files/{f['id']}").json() == f
    assert client.get(f"/v1/files/{f['id']}/content").content == data
    missing = client.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": CHAT,
                                               "completion_window": "24h"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
    assert client.get("/v1/batches/batch_nope").status_code == 404
    empty = upload(client, b"")
    assert empty.status_code == 200, empty.text  # an empty file is a file; a batch of it is refused
    refused = client.post("/v1/batches", json={"input_file_id": empty.json()["id"], "endpoint": CHAT,
                                               "completion_window": "24h"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_file"
    purpose = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", data)})
    assert purpose.status_code == 400 and purpose.json()["error"]["param"] == "purpose"
    assert client.delete(f"/v1/files/{f['id']}").json()["deleted"] is True
    assert client.get(f"/v1/files/{f['id']}").status_code == 404


def test_batch_endpoints_need_the_key_when_keys_are_set(jobs_tmp, tiny_dir, cluster) -> None:
    g = Gateway(jobs_tmp, tiny_dir, cluster.cfg.prefix, "--api-keys", "key-one", name="jobs-keyed")
    try:
        with httpx.Client(base_url=g.url, timeout=30) as c:
            assert c.get("/v1/batches").status_code == 401
            assert c.post("/v1/files", data={"purpose": "batch"}).status_code == 401
            assert c.get("/v1/batches", headers={"Authorization": "Bearer key-one"}).status_code == 200
    finally:
        g.close()
