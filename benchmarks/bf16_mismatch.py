"""How far a bf16 target strays from fp32 decoding, and whether speculation adds to it.

    python -m benchmarks.bf16_mismatch [--model smollm2-135m] [--prompts FILE.jsonl] [--limit 8] [--tokens 48]

fp32 is the lossless path (bit-identical across policies and stage counts, tested). bf16 is not promised to
match fp32; this measures by how much, greedy, per prompt:
  - plain bf16 decoding (pp, one stage) against plain fp32 decoding: where the first token differs, and
    the share of output positions before it (the "agreeing prefix");
  - specpipe in bf16 (N stages, n-gram draft) against plain bf16 decoding: whether speculation changes
    the bf16 output (rows are computed row-invariantly in any dtype, so it should not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scheduler.scheduler import Request
from shared.model_store import load_tokenizer, resolve_model
from shared.types.config import EngineConfig, PolicyConfig, SamplingParams
from specpipe.engine import SimulationConfig, build_pipeline
from specpipe.prompts import encode_chat, read_prompts

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts" / "mt_bench.jsonl"


def decode(model: str, policy: str, stages: int, dtype: str, prompt: list[int], tokens: int) -> list[int]:
    # exact numerics: specpipe equals plain decoding row for row whatever its micro-batches (fast mode's GEMMs
    # follow the micro-batch, and speculation chunks a prompt over the stages, so in bf16 a near-tie can flip)
    cfg = SimulationConfig(model, "ngram", PolicyConfig(policy, stages, 4),
                           EngineConfig(max_new_tokens=tokens, dtype=dtype, numerics="exact"))
    pipe = build_pipeline(cfg)[0]
    return pipe.generate(Request("m", tuple(prompt), SamplingParams(), tokens)).output


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or of the shorter end), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(model: str, prompts: Path, limit: int, tokens: int, stages: int) -> list[dict]:
    tokenizer = load_tokenizer(resolve_model(model))
    rows = []
    for p in read_prompts(prompts, limit):
        ids = encode_chat(tokenizer, p.text)
        fp32 = decode(model, "pp", 1, "float32", ids, tokens)
        bf16 = decode(model, "pp", 1, "bfloat16", ids, tokens)
        spec = decode(model, "specpipe", stages, "bfloat16", ids, tokens)
        rows.append({"id": p.prompt_id, "tokens": len(fp32), "bf16_first_difference": first_difference(fp32, bf16),
                     "specpipe_bf16_equals_plain_bf16": spec == bf16})
    return rows


def markdown(rows: list[dict], model: str, stages: int) -> str:
    differ = [r for r in rows if r["bf16_first_difference"] is not None]
    agree = sum(r["bf16_first_difference"] if r["bf16_first_difference"] is not None else r["tokens"] for r in rows)
    total = sum(r["tokens"] for r in rows)
    lines = [f"| prompt | tokens | bf16 plain: first token that differs from fp32 | specpipe N={stages} bf16 = "
             "plain bf16 |", "|---|---|---|---|"]
    for r in rows:
        first = r["bf16_first_difference"]
        lines.append(f"| {r['id']} | {r['tokens']} | {'—' if first is None else first} | "
                     f"{'yes' if r['specpipe_bf16_equals_plain_bf16'] else 'no'} |")
    lines += ["", f"{model}, greedy: bf16 output differs from fp32 on {len(differ)} of {len(rows)} prompts; the "
              f"agreeing prefixes cover {agree} of {total} output tokens ({100 * agree / max(total, 1):.0f}%). "
              f"specpipe in bf16 equals plain bf16 decoding on "
              f"{sum(r['specpipe_bf16_equals_plain_bf16'] for r in rows)} of {len(rows)} prompts."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bf16_mismatch", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=Path, default=PROMPTS)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--stages", type=int, default=4)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(markdown(measure(a.model, a.prompts, a.limit, a.tokens, a.stages), a.model, a.stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
