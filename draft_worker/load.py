"""A draft worker's speculative source from a name: the n-gram table, or a draft model sharing the tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from draft_worker.draft_model import DraftModelSource
from draft_worker.ngram import NgramSource
from shared.compute.runner import load_stage
from shared.model_store import resolve_model
from shared.types.config import ModelArch
from shared.types.errors import ConfigError
from shared.types.speculation import SpeculativeSource


def load_draft(name: str, target: ModelArch, cache_dir: Path | None, dtype: torch.dtype,
               numerics: str = "exact", device: torch.device | str = "cpu") -> SpeculativeSource:
    if name == "ngram":
        return NgramSource()
    draft_dir = resolve_model(name, cache_dir)
    arch = ModelArch.from_model_dir(draft_dir)
    if arch.vocab_size < target.vocab_size - 1024 or arch.vocab_size > target.vocab_size + 1024:
        raise ConfigError(
            f"draft '{name}' has a vocabulary of {arch.vocab_size} tokens but the target has "
            f"{target.vocab_size}: the draft must share the target's tokenizer"
        )
    return DraftModelSource(load_stage(draft_dir, arch, 0, 1, dtype, numerics=numerics, device=device))
