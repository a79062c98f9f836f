"""`specpipe simulate` as users run it: a real subprocess, JSON out, clean errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specpipe", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _prompts(tmp_path: Path, *turns: str) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": i, "turns": [t]}) for i, t in enumerate(turns)))
    return path


def test_simulate_json_contract(tmp_path) -> None:
    prompts = _prompts(tmp_path, "Say hi.", "Count to five.")
    proc = _run("simulate", "--model", "tiny-random", "--draft", "ngram", "--policy", "specpipe", "--stages", "4",
                "--prompts", str(prompts), "--limit", "2", "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"policy", "stages", "model", "draft", "results", "tokens_per_step"} <= report.keys()
    assert (report["policy"], report["stages"]) == ("specpipe", 4)
    assert [r["id"] for r in report["results"]] == ["0", "1"]
    for r in report["results"]:
        assert {"id", "output_ids", "steps", "new_tokens"} <= r.keys()
        assert r["new_tokens"] == len(r["output_ids"]) and 0 < r["new_tokens"] <= 8
    total = sum(r["new_tokens"] for r in report["results"]) / sum(r["steps"] for r in report["results"])
    assert report["tokens_per_step"] == pytest.approx(total)


def test_simulate_table_output() -> None:
    proc = _run("simulate", "--model", "tiny-random", "--policy", "pp", "--stages", "2", "--limit", "1",
                "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "tokens_per_step" in proc.stdout


def _corrupt_model(tmp_path: Path) -> Path:
    from shared.model_store import resolve_model

    folder = tmp_path / "corrupt-model"
    shutil.copytree(resolve_model("tiny-random"), folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    return folder


BAD_INPUTS = {
    "unknown-model": (lambda tmp: ["--model", "no-such-model"], "unknown model"),
    "corrupt-model-file": (lambda tmp: ["--model", str(_corrupt_model(tmp))], "corrupt"),
    "unknown-draft": (lambda tmp: ["--draft", "no-such-draft"], "unknown model"),
    "prompt-longer-than-context": (
        lambda tmp: ["--prompts", str(_prompts(tmp, "word " * 3000))], "exceeds the model's context"),
    "more-stages-than-layers": (lambda tmp: ["--stages", "9"], "cannot split 8 layers into 9 stages"),
    "width-zero": (lambda tmp: ["--width", "0"], "width must be >= 1"),
    "bad-prompt-file": (lambda tmp: ["--prompts", str(_write(tmp, "not json"))], "expected a JSON object"),
    "missing-prompt-file": (lambda tmp: ["--prompts", str(tmp / "nope.jsonl")], "cannot read prompt file"),
    "bad-temperature": (lambda tmp: ["--temperature", "-1"], "temperature must be >= 0"),
}


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "bad.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gives_clear_error(tmp_path, case) -> None:
    make_args, message = BAD_INPUTS[case]
    base = {"--model": "tiny-random", "--draft": "ngram", "--policy": "specpipe", "--stages": "2"}
    extra = make_args(tmp_path)
    for flag, value in base.items():
        if flag not in extra:
            extra += [flag, value]
    proc = _run("simulate", *extra, "--max-new-tokens", "4", "--limit", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and message in proc.stderr, proc.stderr


def test_models_list() -> None:
    proc = _run("models", "list")
    assert proc.returncode == 0, proc.stderr
    for name in ("tiny-random", "smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        assert name in proc.stdout
