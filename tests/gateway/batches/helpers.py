"""Batch-job test helpers: a real `python -m gateway.batches.worker` process, uploads, polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.cluster import REDIS_URL, ROOT
from tests.gateway.conftest import MODEL_NAME


class BatchWorker:
    """One Celery batch worker for the cluster's prefix; `kill()` is a SIGKILL, `start()` a fresh process."""

    def __init__(self, tmp: Path, model: Path, prefix: str, *args: str):
        self.tmp, self.model, self.prefix, self.args = tmp, model, prefix, args
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 60) -> None:
        self.starts += 1
        self.log_path = self.tmp / f"batch-worker-{self.prefix}-{self.starts}.log"
        cmd = [sys.executable, "-m", "gateway.batches.worker", "--redis-url", REDIS_URL, "--prefix", self.prefix,
               "--model", str(self.model), "--served-model-name", MODEL_NAME, "--stages", "2", *self.args]
        with self.log_path.open("w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while "ready." not in self.log():
            assert self.proc.poll() is None, f"batch worker exited: {self.log()}"
            assert time.monotonic() < deadline, f"batch worker not ready: {self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no ack, no lease release."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client: httpx.Client, data: bytes, name: str = "batch.jsonl") -> httpx.Response:
    return client.post("/v1/files", data={"purpose": "batch"}, files={"file": (name, data, "application/jsonl")})


def create_batch(client: httpx.Client, rows: list[dict], endpoint: str = "/v1/chat/completions") -> dict:
    f = upload(client, jsonl(rows))
    assert f.status_code == 200, f.text
    b = client.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": endpoint,
                                         "completion_window": "24h"})
    assert b.status_code == 200, b.text
    return b.json()


def wait_batch(client: httpx.Client, batch_id: str, until=lambda b: b["status"] in ("completed", "failed",
               "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.2)


def output_lines(client: httpx.Client, file_id: str) -> list[dict]:
    r = client.get(f"/v1/files/{file_id}/content")
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]
