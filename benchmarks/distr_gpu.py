"""DistrAttention's Triton kernel against SDPA's flash kernel on one NVIDIA GPU, in bf16, within a time budget.

    python -m benchmarks.distr_gpu [--lengths 4096 8192 16384 32768] [--dims 64 128] [--heads 16]
        [--budget-s 80] [--out DIR]

Causal attention over one sequence [L, h, d] (MHA), random bf16 inputs: SDPA restricted to its flash backend
(torch.nn.attention.sdpa_kernel(FLASH_ATTENTION)) against distr_attention_triton at G = 2 and 4, both fuses,
the default settings otherwise (l = 128, 64 keys per tile, strided, Gray code). Times by CUDA events, median
of --reps after a warm-up (which also compiles each kernel variant); the hash and argsort (torch, on the GPU)
are inside distr's time. Before timing, each distr variant is checked once at the first length against the
torch reference on the same GPU (max |Δ| relative to max |reference|). Sizes are taken in order until
--budget-s is spent; the table says which were left out. Writes distr_gpu.md (and .json) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.compute.distr_attention import distr_attention_reference
from shared.types.config import AttentionConfig

VARIANTS = {f"distr G={G} {fuse}": AttentionConfig("distr", group_size=G, fuse=fuse)
            for G in (2, 4) for fuse in ("mean_sum", "sum_one")}


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), is_causal=True)


def cuda_ms(fn, reps: int) -> float:
    fn()  # warm-up, and Triton's compile on first use
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(d: int, heads: int) -> dict[str, float]:
    """Each variant against the torch reference at 2048 keys (bf16 kernel, fp32 reference of the same inputs)."""
    from shared.compute.distr_triton import distr_attention_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2048, heads, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    errors = {}
    for name, cfg in VARIANTS.items():
        ref = distr_attention_reference(q.float(), k.float(), v.float(), cfg)
        out = distr_attention_triton(q, k, v, cfg).float()
        errors[name] = ((out - ref).abs().max() / ref.abs().max()).item()
    return errors


def measure(length: int, d: int, heads: int, reps: int) -> dict[str, float]:
    from shared.compute.distr_triton import distr_attention_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(length, heads, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    ms = {"sdpa flash": cuda_ms(lambda: flash(q, k, v), reps)}
    ms |= {name: cuda_ms(lambda c=cfg: distr_attention_triton(q, k, v, c), reps) for name, cfg in VARIANTS.items()}
    return ms


def markdown(rows: list[dict], errors: dict, skipped: list[str], gpu: str) -> str:
    names = ["sdpa flash", *VARIANTS]
    lines = [f"DistrAttention (Triton) against SDPA flash on {gpu}, bf16, causal, MHA; ms (x = / SDPA flash).", "",
             "| L | h | d | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        base = r["ms"]["sdpa flash"]
        cells = [f"{r['ms'][n]:.2f}" + ("" if n == "sdpa flash" else f" ({r['ms'][n] / base:.2f}x)") for n in names]
        lines.append(f"| {r['length']} | {r['heads']} | {r['d']} | " + " | ".join(cells) + " |")
    lines += ["", "Max |Δ| / max |reference| at L = 2048 (bf16 kernel, fp32 torch reference): "
              + "; ".join(f"d={d}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
                          for d, errs in errors.items())]
    if skipped:
        lines += ["", f"Left out (budget spent): {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distr_gpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=80.0, help="start no new size after this many seconds")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    errors = {d: check(d, args.heads) for d in args.dims}
    rows, skipped = [], []
    for length in args.lengths:
        for d in args.dims:
            if time.monotonic() > deadline:
                skipped.append(f"L={length} d={d}")
                continue
            ms = measure(length, d, args.heads, args.reps)
            rows.append({"length": length, "d": d, "heads": args.heads, "ms": ms})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = markdown(rows, errors, skipped, torch.cuda.get_device_name())
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distr_gpu.md").write_text(text)
        (args.out / "distr_gpu.json").write_text(json.dumps({"rows": rows, "errors": errors, "skipped": skipped}))
    bad = {n: e for errs in errors.values() for n, e in errs.items() if e > 3e-2}
    if bad:
        print(f"error: the kernel is off the reference: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
