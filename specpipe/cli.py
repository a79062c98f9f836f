"""The `specpipe` command: simulate, models, up, bench.

Every SpecPipeError ends as one line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from shared.service_args import add_attention_args, attention_config
from shared.types.config import (
    DEFAULT_NUMERICS,
    DRAFT_VOCAB_HELP,
    DTYPES,
    LAYER_SPLIT_HELP,
    NGRAM_SHARED_HELP,
    NUMERICS,
    NUMERICS_HELP,
    POLICIES,
    EngineConfig,
    PolicyConfig,
    SamplingParams,
)
from shared.types.errors import SpecPipeError


def _simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="run prompts through the in-process pipeline and count steps")
    p.add_argument("--model", default="smollm2-135m", help="model name or local Hugging Face folder")
    p.add_argument("--draft", default="ngram", help="draft model name/path, or 'ngram'")
    p.add_argument("--policy", choices=POLICIES, default="specpipe")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--width", type=int, default=4, help="tree width W (nodes per level)")
    p.add_argument("--depth", type=int, default=4, help="tree policy: levels per round")
    p.add_argument("--refill-depth", type=int, default=4, help="specpipe: drafted levels in a refill")
    p.add_argument("--branch", type=int, default=4, help="draft proposals per expanded node")
    p.add_argument("--async-scheduling", action="store_true",
                   help="each step scheduled before the verification of the one before it is read (as the "
                        "services' --async-scheduling): prunes and refills one step late")
    p.add_argument("--device", default="cpu",
                   help="where every stage and the draft compute, in this one process: cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the target's dtype (default: bfloat16 on a GPU, float32 on a CPU; float32 is "
                        "bit-identical to plain decoding)")
    p.add_argument("--draft-dtype", choices=DTYPES, default=None,
                   help="the draft model's dtype (default: the target's; any stays lossless: the target verifies)")
    p.add_argument("--draft-vocab", type=int, default=0, help=DRAFT_VOCAB_HELP)
    p.add_argument("--ngram-shared", type=int, default=0, help=NGRAM_SHARED_HELP)
    p.add_argument("--numerics", choices=NUMERICS, default=DEFAULT_NUMERICS,
                   help=NUMERICS_HELP)
    p.add_argument("--layer-split", default="balanced", help=LAYER_SPLIT_HELP)
    p.add_argument("--prompts", type=Path, help="JSONL file with a 'turns' list per line")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="most prompt rows per prefill micro-batch; a shorter prompt goes in one chunk per stage")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_attention_args(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["models"]:
            from shared.model_store import models_main

            return models_main(argv[1:])
        if argv[:1] == ["up"]:
            from specpipe.cluster import up_main

            return up_main(argv[1:])
        if argv[:1] == ["bench"]:  # the benchmarks use the composition layer, not the other way round
            return subprocess.call([sys.executable, "-m", "benchmarks.report", *argv[1:]])
    except SpecPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="specpipe", description="SpecPipe serving toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    sub.add_parser("models", help="fetch or list models (specpipe models fetch NAME | list)")
    sub.add_parser("up", help="start the local cluster (Redis, scheduler, stages, drafts, gateway)")
    sub.add_parser("bench", help="regenerate BENCHMARKS.md (specpipe bench [--quick] [--out DIR] | attention | costs)")
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
    except SpecPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from shared.compute.device import default_dtype, resolve_device
    from specpipe.engine import SimulationConfig
    from specpipe.simulate import run_simulation

    dtype = args.dtype or default_dtype(resolve_device(args.device))  # a device not there: ConfigError, one line
    cfg = SimulationConfig(
        model=args.model,
        draft=args.draft,
        policy=PolicyConfig(args.policy, args.stages, args.width, args.depth, args.refill_depth, args.branch,
                            async_scheduling=args.async_scheduling),
        engine=EngineConfig(prefill_chunk=args.prefill_chunk, max_new_tokens=args.max_new_tokens, dtype=dtype,
                            draft_dtype=args.draft_dtype or dtype, draft_vocab=args.draft_vocab,
                            ngram_shared=args.ngram_shared, numerics=args.numerics, device=args.device,
                            layer_split=args.layer_split),
        cache_dir=args.cache_dir,
        attention=attention_config(args),
    )
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    report = run_simulation(cfg, sampling, args.prompts, args.limit, progress=not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    print(f"policy={report['policy']} stages={report['stages']} model={report['model']} draft={report['draft']}")
    print(f"{'id':>10} {'new':>5} {'steps':>6} {'tok/step':>9}")
    for r in report["results"]:
        rate = r["new_tokens"] / r["steps"] if r["steps"] else 0.0
        print(f"{r['id']:>10} {r['new_tokens']:>5} {r['steps']:>6} {rate:>9.3f}")
    print(f"tokens_per_step = {report['tokens_per_step']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
