"""`specpipe up` as a user runs it, with its supervisor: killed children are restarted, a lost draft worker
leaves outputs identical, a lost stage fails only the in-flight streams (with an OpenAI error chunk naming the
stage) and the pipeline serves again through the same gateway once the stage is back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from shared.transport.redis_io import RedisConfig, alive, connect
from specpipe.cluster import delete_keys, free_port, stop_processes, wait_until_answering
from tests.cluster import REDIS_URL, ROOT
from tests.helpers import pipeline

pytestmark = pytest.mark.multiproc


class Up:
    """`python -m specpipe.cli up` on its own prefix and port; its children found by their command lines."""

    def __init__(self, tmp: Path, model: str, *args: str):
        self.prefix, self.port = f"test-up-{uuid.uuid4().hex[:8]}", free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{self.prefix}.log"
        cmd = [sys.executable, "-m", "specpipe.cli", "up", "--model", model, "--prefix", self.prefix,
               "--port", str(self.port), "--redis-url", REDIS_URL, *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.cfg = RedisConfig(REDIS_URL, self.prefix)
        self.r = connect(self.cfg)
        self.wait_ready()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout_s: float = 120) -> None:
        try:
            wait_until_answering(self.url + "/ready", {"specpipe up": self.proc}, timeout_s, poll_s=0.3)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}: {self.log()[-3000:]}") from exc

    def pid(self, name: str) -> int:
        """The pid of the child named `name` (stage-k, draft-i, scheduler) of this cluster."""
        module, tail = {"scheduler": ("scheduler", []), "draft": ("draft_worker", ["--name", name]),
                        "stage": ("stage_worker", ["--rank", name.rsplit("-", 1)[-1]])}[name.split("-")[0]]
        for proc in Path("/proc").iterdir():
            try:
                args = (proc / "cmdline").read_bytes().decode().split("\0")
            except (OSError, ValueError):
                continue
            if module in args and self.prefix in args and _contains(args, tail):
                return int(proc.name)
        raise LookupError(f"no process for {name}")

    def kill(self, name: str) -> int:
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        return pid

    def close(self) -> None:
        stop_processes([self.proc], signal.SIGINT, grace_s=20)
        delete_keys(self.r, self.prefix)


def _contains(args: list[str], tail: list[str]) -> bool:
    return not tail or any(args[i:i + len(tail)] == tail for i in range(len(args)))


def _stream(url: str, prompt_ids: list[int], max_tokens: int, on_first=None) -> list[dict]:
    """A streaming greedy completion's chunks; `on_first` runs once the first one has arrived."""
    body = {"model": "tiny-random", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[6:]))
            if on_first is not None and len(chunks) == 1:
                on_first()
    return chunks


def _text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0].get("text", "") for c in chunks if c.get("choices"))


def _reference_text(tiny_dir: Path, prompt: list[int], n: int) -> str:
    """Plain decoding in process (pp, one stage), as text."""
    from gateway.codec import TextCodec
    from tests.helpers import generate

    return TextCodec(tiny_dir).decode(generate(pipeline(tiny_dir, "pp", 1), prompt, n).output)


@pytest.fixture
def up(tmp_path, tiny_dir):
    made = []

    def make(*args: str) -> Up:
        made.append(Up(tmp_path, "tiny-random", *args))
        return made[-1]

    yield make
    for u in made:
        u.close()


def test_killed_draft_worker_is_restarted_and_outputs_stay_identical(up, tiny_dir) -> None:
    cluster = up("--draft", str(tiny_dir), "--stages", "2")
    prompt = [5, 17, 99, 3, 5, 17, 42, 7]
    clean = _stream(cluster.url, prompt, 40)
    old = cluster.pid("draft-0")
    killed = _stream(cluster.url, prompt, 40, on_first=lambda: cluster.kill("draft-0"))
    assert _text(killed) == _text(clean) == _reference_text(tiny_dir, prompt, 40)
    assert killed[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not alive(cluster.r, cluster.cfg, "draft-0"):
        time.sleep(0.2)
    assert cluster.pid("draft-0") != old and alive(cluster.r, cluster.cfg, "draft-0"), cluster.log()[-2000:]
    assert "draft-0 exited (killed by SIGKILL); restarting it" in cluster.log()
    assert cluster.proc.poll() is None
    [split] = re.findall(r"layer split ([0-9,]+): the LM head takes", cluster.log())  # --layer-split measured
    for stage in ("stage-0", "stage-1"):  # every stage got the same counts
        args = Path(f"/proc/{cluster.pid(stage)}/cmdline").read_bytes().decode().split("\0")
        assert args[args.index("--layer-split") + 1] == split


def test_killed_stage_fails_in_flight_streams_then_serves_after_its_restart(up, tiny_dir) -> None:
    cluster = up("--policy", "pp", "--stages", "2")
    prompt = [5, 17, 99, 3, 5, 17, 42, 7]
    cut = _stream(cluster.url, prompt, 1500, on_first=lambda: cluster.kill("stage-1"))
    errors = [c["error"] for c in cut if "error" in c]
    assert len(errors) == 1 and "pipeline stage 1 is not running" in errors[0]["message"], cut[-3:]
    cluster.wait_ready()
    after = _stream(cluster.url, prompt, 24)
    assert _text(after) == _reference_text(tiny_dir, prompt, 24)
    assert "stage-1 exited (killed by SIGKILL); restarting it" in cluster.log()
    assert cluster.proc.poll() is None
