"""The gateway's limits against real `python -m gateway` processes: body size (413), admission (429).

/health is polled from another thread throughout the large-body and long-prompt cases: the
event loop must keep answering while a 30 MB body is refused (each poll < 1 s) and while a
~1 MB prompt is tokenized in a worker thread and refused for its length (each poll < 100 ms).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from specpipe.cluster import delete_keys
from tests.cluster import REDIS_URL
from tests.gateway.conftest import MODEL_NAME, Gateway
from tests.gateway.test_errors import assert_error

pytestmark = pytest.mark.multiproc
BIG = 30 * 1024 * 1024
LONG = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 1500, "temperature": 0}


class HealthPoller:
    """Polls /health from its own thread until stopped; `latencies` holds every answer's seconds (inf: failed)."""

    def __init__(self, url: str, interval_s: float = 0.01):
        self.url, self.interval_s, self.latencies = url, interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = c.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - start if ok else float("inf"))
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> str:
        lat = self.latencies
        return f"{len(lat)} polls, median {statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms"


def _assert_413(status: int, body: bytes) -> None:
    assert status == 413, body[:300]
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"


def _chunks(data: bytes, size: int = 1 << 16):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _curl(url: str, path, *headers: str) -> tuple[int, bytes]:
    """curl as a user runs it (it sends `Expect: 100-continue` for a large body); (status, body)."""
    cmd = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", "-H", "content-type: application/json",
           *(x for h in headers for x in ("-H", h)), "--data-binary", f"@{path}", url]
    out = subprocess.run(cmd, capture_output=True, timeout=60, check=True).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


def test_a_30mb_body_gets_413_while_health_keeps_answering(orphan_gateway, tmp_path) -> None:
    data = b"a" * BIG
    path = tmp_path / "big.json"
    path.write_bytes(data)
    seen = {}
    with HealthPoller(orphan_gateway.url) as poller, httpx.Client(base_url=orphan_gateway.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", content=data, headers={"content-type": "application/json"})
        _assert_413(r.status_code, r.content)
        seen["httpx, Content-Length"] = r.status_code
        r = c.post("/v1/completions", content=_chunks(data), headers={"content-type": "application/json"})
        _assert_413(r.status_code, r.content)
        seen["httpx, chunked"] = r.status_code
        assert c.get("/health").status_code == 200  # the same connection: the refused body was drained
        if shutil.which("curl"):
            url = orphan_gateway.url + "/v1/completions"
            for name, headers in (("curl", ()), ("curl, no Expect", ("Expect:",)),
                                  ("curl, chunked", ("Transfer-Encoding: chunked",))):
                status, body = _curl(url, path, *headers)
                _assert_413(status, body)
                seen[name] = status
    print(f"30 MB body: {seen}; /health meanwhile: {poller.summary()}")
    assert len(poller.latencies) >= 5 and max(poller.latencies) < 1.0, poller.latencies


def test_health_stays_fast_while_a_1mb_prompt_is_tokenized_and_refused(orphan_gateway) -> None:
    words = " ".join(f"word{i % 977} and more text, {i}." for i in range(40_000))[:1_000_000]
    bodies = {"/v1/completions": {"model": MODEL_NAME, "prompt": words},
              "/v1/chat/completions": {"model": MODEL_NAME, "messages": [{"role": "user", "content": words}]}}
    with HealthPoller(orphan_gateway.url) as poller, httpx.Client(base_url=orphan_gateway.url, timeout=60) as c:
        took = {}
        for route, body in bodies.items():
            assert len(json.dumps(body)) < 1 << 20  # within the body limit: it reaches the tokenizer
            start = time.perf_counter()
            assert_error(c.post(route, json=body), 400, code="context_length_exceeded")
            took[route] = time.perf_counter() - start
    print(f"1 MB prompt refused after {', '.join(f'{r} {s:.2f} s' for r, s in took.items())}; "
          f"/health meanwhile: {poller.summary()}")
    assert len(poller.latencies) >= 5 and max(poller.latencies) < 0.1, sorted(poller.latencies)[-5:]


def test_batch_files_have_their_own_larger_limit(gw_tmp, tiny_dir) -> None:
    prefix = f"test-files-{uuid.uuid4().hex[:8]}"
    gateway = Gateway(gw_tmp, tiny_dir, prefix, "--max-body-bytes", "4096", "--max-file-bytes", "131072",
                      name="file-limits")
    line = {"custom_id": "", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL_NAME, "prompt": "x" * 900, "max_tokens": 2}}

    def jsonl(n: int) -> bytes:
        return "".join(json.dumps({**line, "custom_id": f"r{i}"}) + "\n" for i in range(n)).encode()

    def upload(c: httpx.Client, data: bytes) -> httpx.Response:
        return c.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})

    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as c:
            r = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "y" * 5000})
            _assert_413(r.status_code, r.content)
            ok = upload(c, jsonl(100))  # ~100 KB: over --max-body-bytes, within --max-file-bytes
            assert ok.status_code == 200 and ok.json()["bytes"] > 4096, ok.text
            assert_error(upload(c, jsonl(150)), 400, code="file_too_large")  # the file itself is over
            r = upload(c, jsonl(300))  # the body passes the file limit and its framing slack: refused unread
            _assert_413(r.status_code, r.content)
    finally:
        gateway.close()
        delete_keys(redis.Redis.from_url(REDIS_URL), prefix)


def _inflight(c: httpx.Client) -> int:
    match = re.search(r"^specpipe:gateway_inflight_requests\{[^}]*\} ([0-9.]+)$", c.get("/metrics").text, re.MULTILINE)
    assert match
    return int(float(match.group(1)))


def _wait_inflight(c: httpx.Client, n: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while _inflight(c) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _inflight(c) == n


def test_max_inflight_refuses_with_429_and_every_ending_frees_its_place(gw_tmp, tiny_dir, cluster) -> None:
    gateway = Gateway(gw_tmp, tiny_dir, cluster.cfg.prefix, "--max-inflight", "2", "--request-timeout", "8",
                      name="max-inflight")
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as c, ThreadPoolExecutor(2) as pool:
            # 16 choices of 1500 tokens each: requests that outlast the 8 s timeout however fast decoding is
            busy = {**LONG, "n": 16}
            a, b = (c.send(c.build_request("POST", "/v1/completions", json={**busy, "stream": True}), stream=True)
                    for _ in range(2))
            assert a.status_code == b.status_code == 200
            assert _inflight(c) == 2
            for body in (LONG, {**LONG, "stream": True}):
                r = c.post("/v1/completions", json=body)
                assert_error(r, 429, code="too_many_requests")
                assert r.headers["Retry-After"] == "1"
            a.close()  # a client that goes away
            _wait_inflight(c, 1)
            timed_out = pool.submit(c.post, "/v1/completions", json=busy)  # ends with 504 after 8 s
            _wait_inflight(c, 2)
            assert c.post(f"/v1/requests/{b.headers['X-Request-Id']}/cancel").json()["cancelled"] is True
            b.read()
            b.close()
            assert_error(timed_out.result(timeout=60), 504, code="timeout")
            _wait_inflight(c, 0)
            assert_error(c.post("/v1/completions", json={**LONG, "max_tokens": 5000}), 400)
            assert_error(c.post("/v1/completions", json={**LONG, "model": "gpt-9"}), 404)
            short = {**LONG, "max_tokens": 3}
            done = list(pool.map(lambda _: c.post("/v1/completions", json=short), range(2)))
            assert [r.status_code for r in done] == [200, 200]
            assert _inflight(c) == 0
    finally:
        gateway.close()
