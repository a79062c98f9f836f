"""What a user would run instead: Hugging Face transformers on the same machine, and SpecPipe's in-process executor.

All in this process, one prompt at a time, greedy, fp32, `threads` torch threads:

- `hf_generate`: `AutoModelForCausalLM.generate(do_sample=False)` on the target alone, and with
  `assistant_model=` a draft model (assisted generation). Models load from the folder `resolve_model`
  returns (`dtype=torch.float32, local_files_only=True`); generation stops at the model's EOS ids (as
  tests/scheduler/test_lossless.py's `_hf_greedy` does). Time = wall clock of `generate()` per prompt,
  prefill included, model loading excluded (reported apart); one untimed 2-token call warms each model up.
  The plain run also times each prompt's `generate(max_new_tokens=1)` (`prefill_s`: generate()'s TTFT).
- `inprocess`: `specpipe.engine.build_pipeline` (N logical stages stepped in lockstep by one process,
  drafting synchronous) serving the prompts one at a time; time = wall clock of `pipeline.generate()`.

Every run returns {"label", "outputs": [[token ids] per prompt], "wall_s": [per prompt], "tokens", "total_s",
"tokens_per_s", ...}: the caller compares outputs token for token.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from shared.model_store import resolve_model
from shared.types.config import EngineConfig, ModelArch, PolicyConfig, SamplingParams, default_refill_depth


@contextmanager
def torch_threads(n: int | None):
    """Run with n torch threads (None: one per core), then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _timed(label: str, outputs: list[list[int]], walls: list[float], **extra) -> dict:
    tokens = sum(len(o) for o in outputs)
    total = sum(walls)
    return {"label": label, "outputs": outputs, "wall_s": walls, "tokens": tokens, "total_s": total,
            "tokens_per_s": tokens / total if total else None, **extra}


def load_hf(name: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32, local_files_only=True)
    return model.eval(), time.perf_counter() - start


def _generate(model, prompt: Sequence[int], max_new_tokens: int, eos: list[int], assistant=None) -> list[int]:
    ids = torch.tensor([list(prompt)])
    kw = {"assistant_model": assistant} if assistant is not None else {}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos or None, pad_token_id=(eos or [0])[0], **kw)
    return out[0, ids.shape[1]:].tolist()


def hf_generate(model: str, assistant: str | None, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                threads: int | None = None) -> list[dict]:
    """[plain generate run, assisted run (if `assistant`)] on the prompts, one at a time."""
    eos = list(ModelArch.from_model_dir(resolve_model(model)).eos_token_ids)
    runs = []
    with torch_threads(threads) as n_threads:
        target, load_s = load_hf(model)
        helper, helper_load_s = load_hf(assistant) if assistant else (None, 0.0)
        settings = [("hf_generate", None, load_s)]
        settings += [("hf_assisted", helper, load_s + helper_load_s)] if helper is not None else []
        for label, extra, loading in settings:
            _generate(target, prompts[0], 2, eos, extra)  # warm-up, untimed
            outputs, walls, prefill = [], [], []
            for p in prompts:
                start = time.perf_counter()
                outputs.append(_generate(target, p, max_new_tokens, eos, extra))
                walls.append(time.perf_counter() - start)
                if extra is None:  # generate()'s time to first token: the prompt's forward and one token
                    start = time.perf_counter()
                    _generate(target, p, 1, eos)
                    prefill.append(time.perf_counter() - start)
            runs.append(_timed(label, outputs, walls, threads=n_threads, load_s=loading,
                               assistant=assistant if extra is not None else None,
                               **({"prefill_s": prefill} if extra is None else {})))
        del target, helper
        gc.collect()
    return runs


def inprocess(model: str, draft: str, policy: str, stages: int, width: int, refill_depth: int | None,
              prompts: Sequence[Sequence[int]], max_new_tokens: int, threads: int | None = None,
              numerics: str = "exact") -> dict:
    """SpecPipe's in-process executor serving the prompts one at a time (greedy, the model's EOS ids stop)."""
    from scheduler.scheduler import Request
    from specpipe.engine import SimulationConfig, build_pipeline

    refill = refill_depth if refill_depth is not None else default_refill_depth(stages)
    cfg = SimulationConfig(model, draft, PolicyConfig(policy, stages, width, refill_depth=refill),
                           EngineConfig(max_new_tokens=max_new_tokens, numerics=numerics))
    with torch_threads(threads) as n_threads:
        start = time.perf_counter()
        pipe, _, arch = build_pipeline(cfg)
        load_s, stop = time.perf_counter() - start, frozenset(arch.eos_token_ids)
        pipe.generate(Request("warm-up", tuple(prompts[0]), SamplingParams(), 2, stop))  # untimed
        outputs, walls, steps = [], [], []
        for i, p in enumerate(prompts):
            start = time.perf_counter()
            state = pipe.generate(Request(f"p{i}", tuple(p), SamplingParams(), max_new_tokens, stop))
            walls.append(time.perf_counter() - start)
            outputs.append(list(state.output))
            steps.append(state.stats.steps)
        del pipe
        gc.collect()
    tokens = sum(len(o) for o in outputs)
    suffix = "" if numerics == "exact" else f"_{numerics}"
    return _timed(f"inprocess_{policy}_N{stages}{suffix}", outputs, walls, threads=n_threads, load_s=load_s,
                  stages=stages, numerics=numerics,
                  policy=policy, draft=draft if policy != "pp" else None, steps=sum(steps),
                  tokens_per_step=tokens / sum(steps) if sum(steps) else None)
