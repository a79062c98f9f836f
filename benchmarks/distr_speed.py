"""DistrAttention's CPU path against torch's SDPA, side by side, and where its time goes.

    python -m benchmarks.distr_speed [--lengths 4096 8192 16384] [--dims 64 128] [--threads 1] [--reps 3] [--flex]

Causal attention over one random fp32 sequence [L, h, d] (MHA), per (L, d), methods interleaved, median of
`reps` runs:
- sdpa: torch.nn.functional.scaled_dot_product_attention(is_causal=True) on [1, h, L, d] (its CPU flash kernel);
- sdpa_fused_qk: SDPA fed the fused Q' and K' (width d/G = d/2) with V at width d and scale 1/sqrt(d). torch's
  CPU flash kernel needs one head dim for q, k and v, so SDPA falls back to its math path, which materializes
  the [h, L, L] scores: timed only up to --math-max-len;
- sdpa_vsplit: the one legal way to give SDPA's flash kernel q and k at width d/2: V cut into two slices of
  width d/2 and one SDPA call per slice, each recomputing Q'·K'ᵀ and the softmax;
- distr G=1 / G=2 / G=4: shared.compute.distr_attention.distr_attention with the default AttentionConfig
  (G = 1 is the same loop with nothing fused: the loop's own cost against SDPA's kernel);
- the parts of distr at G = 2 and 4: `groups` (SimHash, Gray code, argsort of every block's columns) and `fuse`
  (Q' per block, and K' [keys, d/G] for every (block, head): the gather-and-sum the method repeats per block);
  the rest of distr's time is its Q'·K'ᵀ, softmax and P·V matmuls;
- spread G=2 / G=4: shared.compute.distr_sdpa.distr_attention_sdpa, the same DistrAttention as one SDPA call on
  Q̃ (the fused queries spread back to width d, so K stays as it is), and its part `spread` (Q̃ from Q);
- with --flex, benchmarks.distr_flex: flex_full (FlexAttention at width d) and flex_narrow (q, k at width d/2,
  v at d, one K' for all blocks: a lower bound on a FlexAttention DistrAttention). Each compiles on its first
  call (about 30-60 s here), untimed.
Prints two markdown tables (times and ratios, then distr's parts); the machine's load average at the start and end says how busy the CPU was.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.attention import round_ms
from benchmarks.distr_flex import flex_timers
from benchmarks.provenance import load_average, machine_fields
from shared.compute.distr_attention import distr_attention
from shared.compute.distr_groups import column_groups, fuse_keys, fuse_queries
from shared.compute.distr_sdpa import distr_attention_sdpa, spread_queries
from shared.service_args import set_threads
from shared.types.config import AttentionConfig


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[L, h, d] each -> [1, h, L, d]; 4-D inputs and one head dim select torch's CPU flash kernel."""
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
    return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)


def sdpa_fused_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with q and k at width d/2 and v at width d (what fused inputs look like; the values do not matter)."""
    half = q.shape[-1] // 2
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q[..., :half], k[..., :half], v))
    return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=q.shape[-1] ** -0.5)


def sdpa_vsplit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """SDPA's flash kernel with q and k at width d/2: one call per half of V (each of width d/2)."""
    half = q.shape[-1] // 2
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q[..., :half], k[..., :half], v))
    return [F.scaled_dot_product_attention(q4, k4, v4[..., s : s + half], is_causal=True, scale=q.shape[-1] ** -0.5)
            for s in (0, half)]


def fuse_only(q: torch.Tensor, k: torch.Tensor, cfg: AttentionConfig, groups: torch.Tensor) -> None:
    """distr_attention's fusing alone: Q' per block, K' [block keys, d/G] per (block, head). q, k: [L, h, d]."""
    keys = k.permute(1, 0, 2).contiguous()  # [h, L, d]
    for block, start in enumerate(range(0, q.shape[0], cfg.block_rows)):
        q_block = q[start : start + cfg.block_rows].transpose(0, 1)  # [h, m, d]
        fuse_queries(q_block, groups[block], cfg.fuse)
        for j in range(q.shape[1]):
            fuse_keys(keys[j, : start + q_block.shape[1]], groups[block, j], cfg.fuse)


def measure(length: int, d: int, heads: int, reps: int, math_max_len: int, flex: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(length, heads, d, generator=gen) for _ in range(3))  # [L, h, d]
    cfgs = {G: AttentionConfig("distr", group_size=G) for G in (1, 2, 4)}
    groups = {G: column_groups(q, cfgs[G]) for G in (2, 4)}
    fns = {"sdpa": lambda: sdpa(q, k, v), "sdpa_vsplit": lambda: sdpa_vsplit(q, k, v)}
    if length <= math_max_len:
        fns["sdpa_fused_qk"] = lambda: sdpa_fused_qk(q, k, v)
    fns |= {f"distr_g{G}": (lambda c=c: distr_attention(q, k, v, c)) for G, c in cfgs.items()}
    for G in (2, 4):
        c, g = cfgs[G], groups[G]
        fns[f"spread_sdpa_g{G}"] = lambda c=c: distr_attention_sdpa(q, k, v, c)
        fns[f"groups_g{G}"] = lambda c=c: column_groups(q, c)
        fns[f"fuse_g{G}"] = lambda c=c, g=g: fuse_only(q, k, c, g)
        fns[f"spread_g{G}"] = lambda c=c, g=g: spread_queries(q, g, c.block_rows, c.fuse)
    if flex:
        fns |= flex_timers(q, k, v, group_size=2)
    times = round_ms(fns, reps, warmup=True)
    return {"length": length, "d": d, "heads": heads, "ms": {name: statistics.median(t) for name, t in times.items()},
            "x": {name: statistics.median(a / b for a, b in zip(t, times["sdpa"])) for name, t in times.items()}}


def _cell(values: dict, name: str, ratio: bool = False) -> str:
    """A time in ms, or a ratio; "—" where it was not timed."""
    if name not in values:
        return "—"
    return f"{values[name]:.2f}x" if ratio else f"{values[name]:.0f}"


TIMES = [("SDPA", "sdpa"), ("SDPA fused Q,K (math)", "sdpa_fused_qk"), ("SDPA fused Q,K, V split", "sdpa_vsplit"),
         ("distr G=1", "distr_g1"), ("G=2", "distr_g2"), ("G=4", "distr_g4"), ("spread G=2", "spread_sdpa_g2"),
         ("spread G=4", "spread_sdpa_g4"), ("flex d", "flex_full"), ("flex d/2, one K'", "flex_narrow")]
RATIOS = ["distr_g2", "distr_g4", "spread_sdpa_g2", "spread_sdpa_g4", "sdpa_vsplit", "flex_full", "flex_narrow"]


def markdown(rows: list[dict], args: argparse.Namespace, machine: dict, load_end: float) -> str:
    flag = " --flex" if getattr(args, "flex", False) else ""
    head = [name for name, _ in TIMES] + [f"{n} x" for n in ("G=2", "G=4", "spread G=2", "spread G=4", "V split",
                                                             "flex d", "flex d/2")]
    lines = [
        (f"`python -m benchmarks.distr_speed --threads {args.threads}{flag}` on {machine['cpu']}, {machine['cores']} "
         f"cores, torch {machine['torch']}, {args.threads} thread(s), fp32, causal, MHA; median of {args.reps}; load "
         f"average {machine['load_avg_start']:.1f} at the start, {load_end:.1f} at the end. Times in ms (median); "
         f"x = the median over rounds of time / SDPA's time in the same round."),
        "",
        "| L | h | d | " + " | ".join(head) + " |",
        "|" + "---|" * (3 + len(head)),
    ]
    for r in rows:
        cells = [_cell(r["ms"], key) for _, key in TIMES] + [_cell(r["x"], key, ratio=True) for key in RATIOS]
        lines.append(f"| {r['length']} | {r['heads']} | {r['d']} | " + " | ".join(cells) + " |")
    lines += ["", ("Where distr's time goes (ms): the matmul path's hash, K' and Q' fusion, and the rest; "
                   "the spread path's Q̃."), "",
              ("| L | d | G=2: groups | fuse | matmuls+softmax | G=4: groups | fuse | matmuls+softmax | spread G=2 "
               "| spread G=4 |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        parts = [f"{ms[f'groups_g{G}']:.0f} | {ms[f'fuse_g{G}']:.0f} | "
                 f"{ms[f'distr_g{G}'] - ms[f'groups_g{G}'] - ms[f'fuse_g{G}']:.0f}" for G in (2, 4)]
        lines.append(f"| {r['length']} | {r['d']} | " + " | ".join(parts)
                     + f" | {ms['spread_g2']:.0f} | {ms['spread_g4']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distr_speed")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--math-max-len", type=int, default=4096, help="longest L for SDPA's math fallback ([h, L, L])")
    p.add_argument("--flex", action="store_true", help="also time FlexAttention (benchmarks.distr_flex)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    machine = machine_fields()
    rows = [measure(length, d, args.heads, args.reps, args.math_max_len, args.flex)
            for length in args.lengths for d in args.dims]
    print(markdown(rows, args, machine, load_average()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
