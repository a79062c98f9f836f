"""The services on this CPU against transformers `generate()`, one request at a time, in one run.

    python -m benchmarks.services_cpu [--model qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
        [--max-new-tokens 64] [--prompts-per-file 1] [--numerics fast] [--out DIR]

The services (`specpipe.cluster`'s processes: scheduler, 2 stage processes, one draft worker for the draft model;
requests straight into Redis, tokens timed as they leave, benchmarks.serving's section 1) serve pp and specpipe; then
transformers `generate()` decodes the same prompts in this process (2 threads), and times each prompt's
`generate(max_new_tokens=1)` as its prefill. tok/s counts prefill on both sides (tokens / end-to-end time).
The last lines read `services: specpipe X.XXx generate() tok/s` and `TTFT (N-token prompt) Y.YYx generate()'s`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.hf_baseline import hf_generate
from benchmarks.serving import bench_prompts, compare, full_config, single_request
from shared.types.config import NUMERICS


def report(single: dict, hf: dict, prompts: list[dict]) -> list[str]:
    """The table and the two ratio lines."""
    lines = [(f"# {single['machine']}; {single['model']} (draft {single['draft']}), {len(prompts)} prompts x "
             f"{single['max_new_tokens']} tokens, one at a time"),
             f"{'run':<22} {'tok/s':>7} {'x generate':>11}  TTFT per prompt (s)"]
    lines.append(f"{'hf generate':<22} {hf['tokens_per_s']:>7.2f} {1.0:>10.2f}x  prefill "
                 + " ".join(f"{s:.2f}" for s in hf["prefill_s"]))
    for policy, v in single["policies"].items():
        ttft = [r["ttft_s"] for r in v["requests_detail"]]
        lines.append(f"{'services ' + policy:<22} {v['tokens_per_s']:>7.2f} "
                     f"{v['tokens_per_s'] / hf['tokens_per_s']:>10.2f}x  " + " ".join(f"{t:.2f}" for t in ttft))
    spec = single["policies"].get("specpipe")
    if spec:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]["ids"]))
        ttft = spec["requests_detail"][longest]["ttft_s"]
        lines.append(f"services: specpipe {spec['tokens_per_s'] / hf['tokens_per_s']:.2f}x generate() tok/s")
        lines.append(f"TTFT ({len(prompts[longest]['ids'])}-token prompt) {ttft / hf['prefill_s'][longest]:.2f}x "
                     f"generate()'s ({ttft:.2f} s against {hf['prefill_s'][longest]:.2f} s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.services_cpu", description=__doc__.splitlines()[0])
    base = full_config()
    p.add_argument("--model", default=base.model)
    p.add_argument("--draft", default=base.draft)
    p.add_argument("--draft-dtype", default="float32",
                   help="the draft's dtype (float32, specpipe up's CPU default: bf16 is emulated, and slow, without "
                        "AVX512-BF16)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts-per-file", type=int, default=1)
    p.add_argument("--numerics", choices=NUMERICS, default=base.numerics)
    p.add_argument("--threads", type=int, default=None, help="torch threads per cluster process")
    p.add_argument("--hf-threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    cfg = dataclasses.replace(base, model=a.model, draft=a.draft, draft_dtype=a.draft_dtype,
                              max_new_tokens=a.max_new_tokens, prompts_per_file=a.prompts_per_file,
                              numerics=a.numerics, threads=a.threads, hf_threads=a.hf_threads)
    prompts = bench_prompts(cfg, cfg.model, cfg.prompts_per_file)
    single = single_request(cfg)
    hf = hf_generate(cfg.model, None, [q["ids"] for q in prompts], cfg.max_new_tokens, cfg.hf_threads)[0]
    outputs = {p: [r["output_ids"] for r in v["requests_detail"]] for p, v in single["policies"].items()}
    same = compare(hf["outputs"], outputs, prompts)
    lines = report(single, hf, prompts)
    lines.insert(1, f"numerics {cfg.numerics}; outputs identical to generate(): {same['identical']} "
                    f"({len(same['mismatches'])} mismatches)" + (f"; error: {single['error']}" if single["error"] else ""))
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "services_cpu.json").write_text(json.dumps({"single_request": single, "hf_generate": hf,
                                                             "compare": same, "lines": lines}, indent=1))
        (a.out / "services_cpu.md").write_text("\n".join(lines) + "\n")
    return 0 if not single["error"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
