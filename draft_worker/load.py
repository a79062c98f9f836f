"""A draft worker's speculative source from a name: the n-gram table, or a draft model sharing the tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from draft_worker.draft_model import DraftModelSource
from draft_worker.vocab import SubsetHead, subset_tokens
from shared.compute.model import rowwise_linear
from shared.compute.runner import StageRunner
from shared.compute.weights import load_stage_weights
from shared.drafting.ngram import NgramSource
from shared.model_store import resolve_model
from shared.types.config import ModelArch
from shared.types.errors import ConfigError
from shared.types.speculation import SpeculativeSource


def load_draft(name: str, target: ModelArch, cache_dir: Path | None, dtype: torch.dtype,
               numerics: str = "exact", device: torch.device | str = "cpu", vocab: int = 0,
               ngram_shared: int = 0) -> SpeculativeSource:
    """`vocab` > 0: the draft's LM head scores the `vocab` most frequent tokens and each request's own (vocab.py);
    0: every token. `ngram_shared` > 0: the n-gram draft's table across requests, in tokens (ngram.py)."""
    if name == "ngram":
        return NgramSource(shared_tokens=ngram_shared)
    draft_dir = resolve_model(name, cache_dir)
    arch = ModelArch.from_model_dir(draft_dir)
    if arch.vocab_size < target.vocab_size - 1024 or arch.vocab_size > target.vocab_size + 1024:
        raise ConfigError(
            f"draft '{name}' has a vocabulary of {arch.vocab_size} tokens but the target has "
            f"{target.vocab_size}: the draft must share the target's tokenizer"
        )
    weights = load_stage_weights(draft_dir, arch, 0, arch.num_layers, dtype, device)
    subset = None
    tokens = subset_tokens(arch, vocab, weights.lm_head.device)  # ConfigError for too few (or negative)
    if tokens is not None:
        full = weights.embed if arch.tie_embeddings else weights.lm_head  # tied: the head was a copy, now freed
        lin = F.linear if numerics != "exact" else rowwise_linear  # not the runner's: it knows packed weights only
        subset = SubsetHead(tokens, full, weights.final_norm, arch.rms_eps, lin)
        weights.lm_head = weights.lm_head[tokens]  # [N, H], a copy: the runner packs and reads only these rows
    return DraftModelSource(StageRunner(arch, weights, numerics=numerics), subset)
