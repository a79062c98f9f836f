"""Kernel efficiency: plain decoding through our engine (pp, one stage, in process) against transformers'
`generate()`, same model, prompts and threads, greedy, fp32, in one run; exact and fast numerics side by side.

    python -m benchmarks.kernels [--model smollm2-135m] [--prompts FILE] [--limit 4] [--max-new-tokens 64]

Prints one row per run (tok/s, its ratio to generate(), prompts whose output differs from generate()'s and from
exact numerics', i.e. plain decoding) and, last, `kernels: exact X.XXx fast Y.YYx generate(); fast differs on
K of N prompts` on the machine named in the header.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.hf_baseline import hf_generate, inprocess
from benchmarks.provenance import machine
from shared.model_store import load_tokenizer, resolve_model
from specpipe.prompts import encode_chat, read_prompts

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts" / "mt_bench.jsonl"


def _diverged(run: dict, reference: dict) -> int:
    """Prompts whose output differs from the reference's anywhere."""
    return sum(a != b for a, b in zip(run["outputs"], reference["outputs"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=Path, default=PROMPTS)
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    a = p.parse_args(argv)
    tokenizer = load_tokenizer(resolve_model(a.model))
    prompts = [encode_chat(tokenizer, q.text) for q in read_prompts(a.prompts, a.limit)]
    hf = hf_generate(a.model, None, prompts, a.max_new_tokens, a.threads)[0]
    runs = [inprocess(a.model, "ngram", "pp", 1, 1, None, prompts, a.max_new_tokens, a.threads, numerics=n)
            for n in ("exact", "fast")]
    print(f"# {machine()}; {a.model}, {len(prompts)} prompts x {a.max_new_tokens} tokens, {hf['threads']} threads")
    print(f"{'run':<28} {'tok/s':>7} {'x generate':>11} {'differ: generate':>17} {'differ: exact':>14}")
    for run in [hf, *runs]:
        print(f"{run['label']:<28} {run['tokens_per_s']:>7.2f} {run['tokens_per_s'] / hf['tokens_per_s']:>10.2f}x "
              f"{_diverged(run, hf):>17} {_diverged(run, runs[0]):>14}")
    exact, fast = (r["tokens_per_s"] / hf["tokens_per_s"] for r in runs)
    print(f"kernels: exact {exact:.2f}x fast {fast:.2f}x generate(); fast differs on {_diverged(runs[1], runs[0])} "
          f"of {len(prompts)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
