"""Fast (or compiled) numerics' divergence from plain decoding, per prompt set, greedy and seeded.

Plain decoding is numerics exact, pp on one stage, same model, device and dtype (bit-identical to every exact
policy). Each candidate (numerics fast or compiled, a policy and a stage count) decodes the same prompts; a prompt
diverges when its tokens differ anywhere. Those modes can diverge only where rounding flips a near-tie, so the
rate is measured here, never asserted.

    python -m benchmarks.divergence [--model smollm2-135m] [--limit 20] [--max-new-tokens 32]
        [--device cpu] [--dtype float32] [--numerics fast|compiled] [--out DIR]

Prints one row per (prompt set, sampling, candidate) and writes divergence.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.provenance import machine, torch_version
from scheduler.scheduler import Request
from shared.model_store import load_tokenizer, resolve_model
from shared.types.config import NUMERICS, EngineConfig, PolicyConfig, SamplingParams
from specpipe.engine import SimulationConfig, build_pipeline
from specpipe.prompts import encode_chat, read_prompts

PROMPT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
SETS = ("mt_bench", "alpaca", "sum")
CANDIDATES = (("pp", 1), ("specpipe", 4))  # fast numerics: plain decoding itself, and a 4-stage SpecPipe
SAMPLINGS = {"greedy": None, "seeded": (0.8, 0.95)}  # seeded: temperature, top-p; seed = the prompt's index


@dataclass(frozen=True)
class DivergenceConfig:
    model: str = "smollm2-135m"
    draft: str = "ngram"
    limit: int = 20  # prompts per set (three sets)
    max_new_tokens: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    prompt_dir: Path = PROMPT_DIR
    numerics: str = "fast"  # the candidates' (fast or compiled); plain decoding is exact


def _sampling(kind: str, index: int) -> SamplingParams:
    if SAMPLINGS[kind] is None:
        return SamplingParams()
    temperature, top_p = SAMPLINGS[kind]
    return SamplingParams(temperature=temperature, top_p=top_p, seed=index)


def _decode(cfg: DivergenceConfig, numerics: str, policy: str, stages: int, prompts: list, kind: str) -> list:
    engine = EngineConfig(max_new_tokens=cfg.max_new_tokens, numerics=numerics, device=cfg.device, dtype=cfg.dtype,
                          draft_dtype=cfg.dtype)
    sim = SimulationConfig(cfg.model, cfg.draft, PolicyConfig(policy, stages, 3), engine)
    pipe = build_pipeline(sim)[0]
    return [pipe.generate(Request(f"{kind}{i}", tuple(p), _sampling(kind, i), cfg.max_new_tokens)).output
            for i, p in enumerate(prompts)]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Prompts that diverge, where, and the tokens compared up to each divergence (the rate's denominator)."""
    firsts = [_first_difference(a, b) for a, b in zip(reference, candidate)]
    diverged = [f for f in firsts if f is not None]
    compared = sum(len(a) if f is None else f + 1 for a, f in zip(reference, firsts))
    return {"prompts": len(reference), "diverged": len(diverged), "first_divergence": diverged,
            "tokens_compared": compared, "per_1k_tokens": 1000 * len(diverged) / compared if compared else 0.0}


def run(cfg: DivergenceConfig) -> dict:
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    rows = []
    for name in SETS:
        prompts = [encode_chat(tokenizer, q.text) for q in read_prompts(cfg.prompt_dir / f"{name}.jsonl", cfg.limit)]
        for kind in SAMPLINGS:
            reference = _decode(cfg, "exact", "pp", 1, prompts, kind)
            for policy, stages in CANDIDATES:
                result = compare(reference, _decode(cfg, cfg.numerics, policy, stages, prompts, kind))
                rows.append({"set": name, "sampling": kind, "policy": policy, "stages": stages, **result})
                print(f"{name:<9} {kind:<7} {cfg.numerics} {policy:<8} N={stages}  diverged {result['diverged']:>3} "
                      f"of {result['prompts']:<3} ({result['per_1k_tokens']:.2f} per 1k tokens)", flush=True)
    return {"machine": machine(), "torch": torch_version(), "config": {**cfg.__dict__, "prompt_dir": None},
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.divergence", description=__doc__.splitlines()[0])
    d = DivergenceConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--draft", default=d.draft)
    p.add_argument("--limit", type=int, default=d.limit)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--numerics", choices=[n for n in NUMERICS if n != "exact"], default=d.numerics)
    p.add_argument("--prompt-dir", type=Path, default=PROMPT_DIR, help="where mt_bench/alpaca/sum.jsonl are")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    report = run(DivergenceConfig(a.model, a.draft, a.limit, a.max_new_tokens, a.device, a.dtype, a.prompt_dir,
                                  a.numerics))
    total = sum(r["diverged"] for r in report["rows"])
    print(f"divergence: {total} of {sum(r['prompts'] for r in report['rows'])} prompt runs ({report['machine']})")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        suffix = "" if a.numerics == "fast" else f"-{a.numerics}"
        path = a.out / f"divergence-{a.device.replace(':', '')}-{a.dtype}{suffix}.json"
        path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
