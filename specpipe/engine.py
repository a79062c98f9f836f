"""Compose the in-process engine from names: model, draft, policy, limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from draft_worker.base import SpeculativeSource
from draft_worker.draft_model import DraftModelSource
from draft_worker.ngram import NgramSource
from scheduler.executor import InProcessPipeline
from scheduler.scheduler import Scheduler
from shared.config import AttentionConfig, EngineConfig, ModelArch, PolicyConfig, split_layers
from shared.errors import ConfigError
from shared.model_store import resolve_model
from stage_worker.runner import StageRunner
from stage_worker.weights import load_stage_weights


@dataclass(frozen=True)
class SimulationConfig:
    """Everything `specpipe simulate` composes, in one place."""

    model: str
    draft: str  # a model name/path, or "ngram"
    policy: PolicyConfig
    engine: EngineConfig
    cache_dir: Path | None = None
    attention: AttentionConfig = AttentionConfig()  # the target's prefill attention; the draft stays exact


def load_stages(
    model_dir: Path, arch: ModelArch, stages: int, dtype: torch.dtype, attention: AttentionConfig = AttentionConfig()
) -> list[StageRunner]:
    """One runner per stage, each loading only its own slice of layers."""
    attention.check_head_dim(arch.head_dim)  # before any weights are read
    return [
        StageRunner(arch, load_stage_weights(model_dir, arch, a, b, dtype), attention)
        for a, b in split_layers(arch.num_layers, stages)
    ]


def load_draft(name: str, target: ModelArch, cache_dir: Path | None, dtype: torch.dtype) -> SpeculativeSource:
    if name == "ngram":
        return NgramSource()
    draft_dir = resolve_model(name, cache_dir)
    arch = ModelArch.from_model_dir(draft_dir)
    if arch.vocab_size < target.vocab_size - 1024 or arch.vocab_size > target.vocab_size + 1024:
        raise ConfigError(
            f"draft '{name}' has a vocabulary of {arch.vocab_size} tokens but the target has "
            f"{target.vocab_size}: the draft must share the target's tokenizer"
        )
    runner = StageRunner(arch, load_stage_weights(draft_dir, arch, 0, arch.num_layers, dtype))
    return DraftModelSource(runner)


def build_pipeline(cfg: SimulationConfig, trace_limit: int = 0) -> tuple[InProcessPipeline, Path, ModelArch]:
    dtype = getattr(torch, cfg.engine.dtype)
    model_dir = resolve_model(cfg.model, cfg.cache_dir)
    arch = ModelArch.from_model_dir(model_dir)
    stages = load_stages(model_dir, arch, cfg.policy.stages, dtype, cfg.attention)
    draft_dtype = getattr(torch, cfg.engine.draft_dtype)
    draft = None if cfg.policy.name == "pp" else load_draft(cfg.draft, arch, cfg.cache_dir, draft_dtype)
    scheduler = Scheduler(cfg.policy, cfg.engine, context_limit=arch.max_positions)
    return InProcessPipeline(stages, scheduler, draft, trace_limit), model_dir, arch
