"""Small builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

from pathlib import Path

from scheduler.scheduler import Request, RequestState
from shared.types.config import EngineConfig, PolicyConfig, SamplingParams
from specpipe.engine import SimulationConfig, build_pipeline
from specpipe.executor import InProcessPipeline


def pipeline(
    model: Path, policy: str, stages: int, draft: str = "ngram", width: int = 3, chunk: int = 16, budget: int = 256,
    draft_dtype: str = "float32", numerics: str = "exact", device: str = "cpu", dtype: str = "float32",
    draft_vocab: int = 0, ngram_shared: int = 0, **kw
) -> InProcessPipeline:
    cfg = SimulationConfig(
        model=str(model),
        draft=draft,
        policy=PolicyConfig(policy, stages, width, **kw),
        engine=EngineConfig(prefill_chunk=chunk, token_budget=budget, draft_dtype=draft_dtype,
                            draft_vocab=draft_vocab, ngram_shared=ngram_shared, numerics=numerics, device=device,
                            dtype=dtype),
    )
    return build_pipeline(cfg)[0]


def generate(pipe: InProcessPipeline, prompt: list[int], n: int, sampling: SamplingParams = SamplingParams(), rid: str = "r") -> RequestState:
    return pipe.generate(Request(rid, tuple(prompt), sampling, n))
