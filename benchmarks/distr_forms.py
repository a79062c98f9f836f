"""DistrAttention's two CPU forms against SDPA on the real models' head shapes (grouped-query heads).

    python -m benchmarks.distr_forms [--length 8192] [--prefix-chunk 2048] [--threads 1] [--reps 3]

Random fp32 Q/K/V, G = 2 and 4, per-round ratios to SDPA (median over `reps` rounds, methods interleaved):
- first chunk (q_offset 0, L = n keys) with grouped-query heads, smollm2-135m (h 9, g 3, d 64) and
  qwen2.5-coder-1.5b (h 12, g 2, d 128): SDPA (is_causal, enable_gqa) against the spread form
  (shared.compute.distr_sdpa) and the matmul form (shared.compute.distr_attention);
- a chunk of --prefix-chunk rows after a prefix of L - chunk keys, same heads: SDPA with the [n, L] causal
  mask (torch's is_causal aligns row 0 with key 0, so a prefix needs the mask), against both forms.
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.attention import round_ms
from benchmarks.provenance import load_average, machine_fields
from shared.compute.distr_attention import causal_mask, distr_attention
from shared.compute.distr_sdpa import distr_attention_sdpa
from shared.service_args import set_threads
from shared.types.config import AttentionConfig

SHAPES = {"smollm2-135m": (9, 3, 64), "qwen2.5-coder-1.5b": (12, 2, 128)}  # query heads, kv heads, head dim


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Exact attention by SDPA: is_causal from position 0, else the explicit mask. [n, h, d], [L, g, d] x 2."""
    mask = None if q_offset == 0 else ~causal_mask(q_offset, q.shape[0], 0, k.shape[0])[None, None]
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def measure(model: str, length: int, chunk: int, reps: int) -> dict:
    """One row: per-round ratios to SDPA of both forms, at G = 2 and 4."""
    (h, g, d), gen = SHAPES[model], torch.Generator().manual_seed(0)
    k, v = (torch.randn(length, g, d, generator=gen) for _ in range(2))
    q = torch.randn(chunk, h, d, generator=gen)
    q_offset = length - chunk
    fns = {"sdpa": lambda: sdpa(q, k, v, q_offset)}
    for G in (2, 4):
        c = AttentionConfig("distr", group_size=G)
        fns[f"spread_g{G}"] = lambda c=c: distr_attention_sdpa(q, k, v, c, q_offset=q_offset)
        fns[f"matmul_g{G}"] = lambda c=c: distr_attention(q, k, v, c, q_offset=q_offset)
    times = round_ms(fns, reps, warmup=True)
    return {"model": model, "chunk": chunk, "keys": length, "sdpa_ms": statistics.median(times["sdpa"]),
            "x": {name: statistics.median(a / b for a, b in zip(t, times["sdpa"])) for name, t in times.items()}}


def markdown(rows: list[dict], args: argparse.Namespace, machine: dict, load_end: float) -> str:
    names = [f"{form}_g{G}" for G in (2, 4) for form in ("spread", "matmul")]
    lines = [
        (f"`python -m benchmarks.distr_forms --length {args.length} --prefix-chunk {args.prefix_chunk} --threads "
         f"{args.threads} --reps {args.reps}` on {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; "
         f"load average {machine['load_avg_start']:.1f} at the start, {load_end:.1f} at the end. x = median over "
         "rounds of time / SDPA's time in the same round."),
        "",
        "| shape | query rows | keys | SDPA ms | " + " | ".join(f"{n} x" for n in names) + " |",
        "|" + "---|" * (4 + len(names)),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['chunk']} | {r['keys']} | {r['sdpa_ms']:.0f} | "
                     + " | ".join(f"{r['x'][n]:.2f}x" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distr_forms")
    p.add_argument("--length", type=int, default=8192, help="keys; a first chunk has as many query rows")
    p.add_argument("--prefix-chunk", type=int, default=2048, help="query rows of the chunk after a prefix")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    machine = machine_fields()
    rows = [measure(model, args.length, chunk, args.reps) for chunk in (args.length, args.prefix_chunk)
            for model in SHAPES]
    print(markdown(rows, args, machine, load_average()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
