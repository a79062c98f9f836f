"""Compose the in-process engine from names: model, draft, policy, limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from draft_worker.load import load_draft
from scheduler.scheduler import Scheduler
from shared.compute.device import resolve_device
from shared.compute.runner import load_stage
from shared.model_store import resolve_model
from shared.types.config import AttentionConfig, EngineConfig, ModelArch, PolicyConfig
from specpipe.executor import InProcessPipeline


@dataclass(frozen=True)
class SimulationConfig:
    """Everything `specpipe simulate` composes, in one place."""

    model: str
    draft: str  # a model name/path, or "ngram"
    policy: PolicyConfig
    engine: EngineConfig
    cache_dir: Path | None = None
    attention: AttentionConfig = AttentionConfig()  # the target's prefill attention; the draft stays exact


def build_pipeline(cfg: SimulationConfig, trace_limit: int = 0) -> tuple[InProcessPipeline, Path, ModelArch]:
    dtype = getattr(torch, cfg.engine.dtype)
    device = resolve_device(cfg.engine.device)
    model_dir = resolve_model(cfg.model, cfg.cache_dir)
    arch = ModelArch.from_model_dir(model_dir)
    n, numerics = cfg.policy.stages, cfg.engine.numerics
    stages = [load_stage(model_dir, arch, k, n, dtype, cfg.attention, numerics, device,
                         cfg.engine.layer_split) for k in range(n)]
    draft = None
    if cfg.policy.name != "pp":
        draft_dtype = getattr(torch, cfg.engine.draft_dtype)
        draft = load_draft(cfg.draft, arch, cfg.cache_dir, draft_dtype, numerics, device, cfg.engine.draft_vocab,
                           cfg.engine.ngram_shared)
    scheduler = Scheduler(cfg.policy, cfg.engine, context_limit=arch.max_positions)
    return InProcessPipeline(stages, scheduler, draft, trace_limit), model_dir, arch
