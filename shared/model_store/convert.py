"""Building model folders: GGUF -> Hugging Face conversion (through transformers) and the tiny random model.

Also the readers of what a conversion writes: the tokenizer and the end-of-sequence ids.
transformers and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.model_store.catalogue import MARKER, ModelError, ModelSpec, is_complete, write_folder
from shared.model_store.integrity import file_sha256


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
    return write_folder(out, spec, lambda tmp: convert_into(gguf, tmp, stop_tokens, progress))


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


def convert_into(gguf: Path, dest: Path, stop_tokens: tuple[str, ...], progress: bool) -> None:
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


def build_tiny_random(dest: Path, smollm2: Path) -> None:
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
