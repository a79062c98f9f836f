"""`specpipe simulate`: prompts through the in-process pipeline, one at a time."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from scheduler.scheduler import Request
from shared.model_store import load_tokenizer
from shared.types.config import SamplingParams
from shared.types.errors import RequestError
from specpipe.engine import SimulationConfig, build_pipeline
from specpipe.prompts import encode_chat, read_prompts


def run_simulation(
    cfg: SimulationConfig, sampling: SamplingParams, prompts_file: Path | None, limit: int | None, progress: bool
) -> dict:
    prompts = read_prompts(prompts_file, limit)
    pipeline, model_dir, arch = build_pipeline(cfg)
    tokenizer = load_tokenizer(model_dir)
    stop = frozenset(arch.eos_token_ids)
    requests = []
    for i, prompt in enumerate(prompts):  # check every prompt before any work
        request = Request(f"p{i}", tuple(encode_chat(tokenizer, prompt.text)), sampling, cfg.engine.max_new_tokens, stop)
        try:
            pipeline.scheduler.check(request)
        except RequestError as exc:
            raise RequestError(f"prompt {prompt.prompt_id}: {exc}") from exc
        requests.append(request)
    results = []
    bar = tqdm(zip(prompts, requests), total=len(prompts), disable=not progress, file=sys.stderr,
               desc=f"{cfg.policy.name} N={cfg.policy.stages}")
    for prompt, request in bar:
        state = pipeline.generate(request)
        stats = state.stats
        results.append(
            {
                "id": prompt.prompt_id,
                "output_ids": state.output,
                "steps": stats.steps,
                "new_tokens": len(state.output),
                "accepted": stats.accepted,
                "bonus": stats.bonus,
                "sent_speculative": stats.sent_speculative,
                "pruned": stats.pruned,
            }
        )
    total_steps = sum(r["steps"] for r in results)
    total_tokens = sum(r["new_tokens"] for r in results)
    return {
        "policy": cfg.policy.name,
        "stages": cfg.policy.stages,
        "model": cfg.model,
        "draft": cfg.draft if cfg.policy.name != "pp" else None,
        "width": cfg.policy.width,
        "results": results,
        "tokens_per_step": total_tokens / total_steps if total_steps else 0.0,
    }
