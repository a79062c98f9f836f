"""DistrAttention on CPU: attention-only time and error, and what it does to a real model's prefill.

    python -m benchmarks.attention [--quick] [--out DIR] [--threads N]

1. block_rows sweep: distr_attention (G = 2) time and error for l = 32..256; the fastest l is used below.
2. Attention only, causal, random Gaussian Q/K/V in fp32, one [L, h, d] sequence per length:
   torch's scaled_dot_product_attention (inputs [1, h, L, d], so torch takes its CPU flash kernel),
   the runner's exact per-row path (tree_attention, up to 4k), distr_attention with G = 1 (the same
   per-block matmul loop without fusion), G = 2 and G = 4 (benchmarks.distr_speed splits distr's time into
   its parts). Median of a few repetitions, methods interleaved;
   relative error = ||out - SDPA|| / ||SDPA|| (Frobenius).
3. End to end: SmolLM2-135M perplexity on real text (the prompt sets' turns and reference answers)
   with exact vs DistrAttention prefill, each segment one prefill chunk through StageRunner, and the
   prefill time.
Writes attention.json and attention.md (a BENCHMARKS.md section) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.provenance import load_average, machine_fields
from shared.compute.distr_attention import distr_attention
from shared.compute.model import RowAttention, tree_attention
from shared.compute.runner import RequestInfo, StageRunner
from shared.compute.weights import load_stage_weights
from shared.model_store import load_tokenizer, resolve_model
from shared.service_args import set_threads
from shared.types.batch import MicroBatch, Row
from shared.types.config import AttentionConfig, ModelArch, SamplingParams
from shared.types.errors import SpecPipeError

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
MODEL = "smollm2-135m"
GROUPS = (1, 2, 4)
HEADS = {1024: 8, 2048: 8, 4096: 8, 8192: 4, 16384: 2}  # fewer heads at the longest lengths keep the run ~10 min
RUNNER_EXACT_MAX = 4096  # the per-row exact path reads all of K/V once per query row: too slow beyond
BLOCK_ROWS = (32, 64, 128, 256)


def round_ms(fns: dict, reps: int, warmup: bool = False) -> dict[str, list[float]]:
    """Wall time of each callable in ms, one call of each per round for `reps` rounds (after one untimed call each
    if `warmup`), so load drift hits all alike and times of one round can be compared."""
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def median_ms(fns: dict, reps: int, warmup: bool = False) -> dict[str, float]:
    """Median wall time of each callable in ms over round_ms's rounds."""
    return {name: statistics.median(t) for name, t in round_ms(fns, reps, warmup).items()}


def _qkv(length: int, heads: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(length, heads, d, generator=gen) for _ in range(3))  # [L, h, d] each (MHA: g = h)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused causal attention. [L, h, d] -> [L, h, d]; 4-D inputs select its CPU flash kernel."""
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, h, L, d]
    return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)[0].transpose(0, 1)


def runner_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The stage runner's exact path: each row attends its prefix with its own matmuls. -> [L, h, d]."""
    length, h, d = q.shape
    out = torch.empty(length, h, 1, d)
    heads = SimpleNamespace(num_kv_heads=h, rep=1, head_dim=d)  # all tree_attention reads of the arch
    tree_attention(q, k, v, [RowAttention(i, None, i + 1) for i in range(length)], heads, out)
    return out.view(length, h, d)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def sweep_block_rows(length: int, reps: int) -> list[dict]:
    rows = []
    for d in (64, 128):
        q, k, v = _qkv(length, HEADS[length], d)
        ref = sdpa(q, k, v)
        cfgs = {b: AttentionConfig("distr", group_size=2, block_rows=b) for b in BLOCK_ROWS}
        ms = median_ms({b: (lambda c=c: distr_attention(q, k, v, c)) for b, c in cfgs.items()}, reps)
        rows += [{"length": length, "d": d, "block_rows": b, "ms": ms[b],
                  "rel_err": _rel_err(distr_attention(q, k, v, c), ref)} for b, c in cfgs.items()]
    return rows


def attention_only(lengths: list[int], block_rows: int, reps: int) -> list[dict]:
    rows = []
    for length in lengths:
        for d in (64, 128):
            q, k, v = _qkv(length, HEADS[length], d)
            distr = {G: AttentionConfig("distr", group_size=G, block_rows=block_rows) for G in GROUPS}
            fns = {"sdpa": lambda: sdpa(q, k, v)}
            if length <= RUNNER_EXACT_MAX:
                fns["runner_exact"] = lambda: runner_exact(q, k, v)
            fns |= {f"distr_g{G}": (lambda c=c: distr_attention(q, k, v, c)) for G, c in distr.items()}
            ms = median_ms(fns, reps)
            ref = sdpa(q, k, v)
            rows.append({
                "length": length, "d": d, "heads": HEADS[length], "ms": ms,
                "rel_err": {f"distr_g{G}": _rel_err(distr_attention(q, k, v, c), ref) for G, c in distr.items()},
            })
            print(f"  L={length} d={d}: " + ", ".join(f"{n} {t:.0f} ms" for n, t in ms.items()), file=sys.stderr)
    return rows


def corpus_text() -> str:
    """Every turn and reference answer of the prompt sets, in file order."""
    files = sorted(PROMPTS_DIR.glob("*.jsonl"))
    if not files:
        raise SpecPipeError(f"no prompt sets (*.jsonl) in {PROMPTS_DIR}")
    parts = []
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                parts += [*record.get("turns", []), *record.get("reference", [])]
    return "\n\n".join(parts)


def _prefill_nll(runner: StageRunner, tokens: list[int]) -> tuple[float, float]:
    """One prefill chunk of all tokens; -> (summed next-token NLL over len - 1 predictions, prefill seconds)."""
    runner.add_request("ppl", RequestInfo(len(tokens), SamplingParams()), len(tokens))
    rows = [Row("ppl", -(p + 2), -(p + 1), p, t, True, False) for p, t in enumerate(tokens)]
    start = time.perf_counter()
    hidden = runner.hidden(MicroBatch(0, rows))  # [n, H]
    seconds = time.perf_counter() - start
    runner.release("ppl")
    targets = torch.tensor(tokens[1:])
    nll = 0.0
    for i in range(0, len(tokens) - 1, 256):  # logits [256, V] at a time
        logits = runner.logits(hidden[i : min(i + 256, len(tokens) - 1)])
        nll += F.cross_entropy(logits, targets[i : i + logits.shape[0]], reduction="sum").item()
    return nll, seconds


def perplexity(segments: int, segment_len: int, block_rows: int) -> dict:
    model_dir = resolve_model(MODEL)
    arch = ModelArch.from_model_dir(model_dir)
    tokens = load_tokenizer(model_dir).encode(corpus_text())
    if len(tokens) < segments * segment_len:
        raise SpecPipeError(f"the prompt sets hold {len(tokens)} tokens, fewer than {segments} x {segment_len}")
    weights = load_stage_weights(model_dir, arch, 0, arch.num_layers)
    configs = {"exact": AttentionConfig()} | {
        f"distr_g{G}": AttentionConfig("distr", group_size=G, block_rows=block_rows, layers="all")  # every layer
        for G in GROUPS if G > 1
    }
    nll = {name: 0.0 for name in configs}
    secs: dict[str, list[float]] = {name: [] for name in configs}
    for s in range(segments):
        segment = tokens[s * segment_len : (s + 1) * segment_len]
        for name, cfg in configs.items():  # interleaved, so load drift hits every config alike
            seg_nll, seconds = _prefill_nll(StageRunner(arch, weights, cfg), segment)
            nll[name] += seg_nll
            secs[name].append(seconds)
        print(f"  segment {s}: " + ", ".join(f"{n} {secs[n][-1]:.1f} s" for n in configs), file=sys.stderr)
    predictions = segments * (segment_len - 1)
    return {
        "model": MODEL, "segments": segments, "segment_len": segment_len, "predictions": predictions,
        "block_rows": block_rows,
        "runs": {name: {"perplexity": float(torch.exp(torch.tensor(nll[name] / predictions))),
                        "prefill_s": sum(secs[name])} for name in configs},
    }


def run(quick: bool) -> dict:
    reps = 3
    results: dict = {"quick": quick, "machine": machine_fields(), "reps": reps,
                     "heads": {str(k): v for k, v in HEADS.items()}}
    print("block_rows sweep", file=sys.stderr)
    results["block_rows_sweep"] = sweep_block_rows(1024 if quick else 4096, reps)
    fastest = min(BLOCK_ROWS, key=lambda b: sum(r["ms"] for r in results["block_rows_sweep"] if r["block_rows"] == b))
    results["block_rows"] = fastest
    print(f"attention only (block_rows {fastest})", file=sys.stderr)
    lengths = [1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384]
    results["attention"] = attention_only(lengths, fastest, reps)
    print("perplexity", file=sys.stderr)
    results["perplexity"] = perplexity(1 if quick else 2, 256 if quick else 2048, fastest)
    results["machine"]["load_avg_end"] = load_average()
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "## DistrAttention (approximate prefill attention) on CPU",
        "",
        f"`python -m benchmarks.attention{' --quick' if results['quick'] else ''}` on {m['cpu']}, {m['cores']} cores, "
        f"{m['platform']}, torch {m['torch']} with {m['torch_threads']} thread(s), fp32; 1-minute load average "
        f"{m['load_avg_start']:.1f} at the start and {m.get('load_avg_end', float('nan')):.1f} at the end. "
        f"Median of {results['reps']} runs, methods interleaved. No GPU and no Triton kernel: this is the "
        "PyTorch reference of the method (shared/compute/distr_attention.py).",
        "",
        f"**block_rows** (G = 2; chosen: the fastest, l = {results['block_rows']}):",
        "",
        "| L | d | block_rows | ms | rel. error |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['length']} | {r['d']} | {r['block_rows']} | {r['ms']:.0f} | {r['rel_err']:.3f} |"
              for r in results["block_rows_sweep"]]
    lines += [
        "",
        "**Attention only** (causal, random Gaussian Q/K/V, h = kv heads; time in ms, ratio = time / SDPA; "
        "rel. error = ‖out − SDPA‖ / ‖SDPA‖; runner exact = the per-row path StageRunner uses, up to 4k):",
        "",
        "| L | heads | d | SDPA | runner exact | distr G=1 | G=2 | G=4 | G=1 / SDPA | G=2 / SDPA | G=4 / SDPA "
        "| error G=1 | error G=2 | error G=4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["attention"]:
        ms, err = r["ms"], r["rel_err"]
        exact = f"{ms['runner_exact']:.0f}" if "runner_exact" in ms else "—"
        lines.append(
            f"| {r['length']} | {r['heads']} | {r['d']} | {ms['sdpa']:.0f} | {exact} | {ms['distr_g1']:.0f} | "
            f"{ms['distr_g2']:.0f} | {ms['distr_g4']:.0f} | "
            + " | ".join(f"{ms[f'distr_g{G}'] / ms['sdpa']:.2f}x" for G in GROUPS) + " | "
            + " | ".join(f"{err[f'distr_g{G}']:.2g}" for G in GROUPS) + " |"
        )
    p = results["perplexity"]
    exact = p["runs"]["exact"]
    lines += [
        "",
        f"**End to end**: {p['model']} perplexity on {p['segments']} x {p['segment_len']} tokens of the prompt sets' "
        f"turns and reference answers ({p['predictions']} predictions), each segment one prefill chunk through "
        f"StageRunner (block_rows {p['block_rows']}); prefill time is the whole stage (all 30 layers), "
        "summed over segments:",
        "",
        "| prefill attention | perplexity | vs exact | prefill s | vs exact |",
        "|---|---|---|---|---|",
    ]
    for name, run in p["runs"].items():
        lines.append(f"| {name.replace('distr_g', 'distr G=')} | {run['perplexity']:.2f} | "
                     f"{run['perplexity'] / exact['perplexity'] - 1:+.1%} | {run['prefill_s']:.1f} | "
                     f"{run['prefill_s'] / exact['prefill_s']:.2f}x |")
    lines += ["", _verdict(results)]
    return "\n".join(lines) + "\n"


def _verdict(results: dict) -> str:
    """Where DistrAttention is slower than SDPA on this machine, and why; what it costs in perplexity."""
    rows = results["attention"]
    counts = []
    for G in GROUPS[1:]:
        ratios = [r["ms"][f"distr_g{G}"] / r["ms"]["sdpa"] for r in rows]
        slower = sum(x > 1 for x in ratios)
        counts.append(f"G = {G} at {slower} of {len(rows)} sizes ({min(ratios):.2f}x to {max(ratios):.2f}x "
                      "SDPA's time)")
    runs = results["perplexity"]["runs"]
    ppl = ", ".join(f"G = {n[len('distr_g'):]}: {r['perplexity']:.1f}" for n, r in runs.items() if n != "exact")
    return (
        f"Where it is slower: DistrAttention is slower than SDPA with {'; '.join(counts)}. Why: on CPU the method "
        "can only save part of the work. Fusing columns narrows Q·Kᵀ to d/G, but P·V stays at full width, so at "
        "best (1 − 1/G)/2 of the matmul FLOPs go (25% at G = 2, 37.5% at G = 4), and what it adds is not free "
        "here: the SimHash of every (query block, head), and for every (query block, head) a gather and sum of "
        "K's columns in that block's order (K is re-fused once per query block: O(N²·d / l) memory traffic), and "
        "the scores of each block pass through memory between separate matmul and softmax calls driven by a "
        "Python loop, while SDPA is one fused C++ flash kernel. The paper's speed-ups come from doing "
        f"the fusion inside a GPU kernel's on-chip tiles, which this CPU reference does not have.{_prefill_note(runs)}"
        "\n\n"
        f"Accuracy: perplexity {runs['exact']['perplexity']:.1f} with exact attention against {ppl} with "
        "DistrAttention in every layer and head of the prefill. Fusing makes a group's Q columns one mean column, "
        "which is exact only for equal columns; SimHash groups columns by angle, not length, and the RoPE-rotated "
        "Q columns of a real model are far from equal within a group, so the loss is large on this small model."
    )


def _prefill_note(runs: dict) -> str:
    faster = [n for n, r in runs.items() if n != "exact" and r["prefill_s"] < runs["exact"]["prefill_s"]]
    if not faster:
        return ""
    return (" Where a DistrAttention prefill is faster than exact end to end, that is because the runner's exact "
            "path attends row by row (that keeps tree decoding bit-identical), not because DistrAttention beats a "
            "fused exact kernel.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention")
    p.add_argument("--quick", action="store_true", help="1k and 2k only, a 256-token perplexity")
    p.add_argument("--out", type=Path, help="write attention.json and attention.md in this folder")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    try:
        set_threads(args.threads)
        results = run(args.quick)
    except SpecPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown(results)
    print(text)
    if args.out:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "attention.json").write_text(json.dumps(results, indent=2))
            (args.out / "attention.md").write_text(text)
        except OSError as exc:
            print(f"error: cannot write the results under {args.out}: {exc.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
