"""python -m draft_worker: a speculative source process (draft model or n-grams)."""

from __future__ import annotations

import argparse

import torch

from draft_worker.load import load_draft
from draft_worker.service import DraftService, DraftServiceConfig
from shared.model_store import resolve_model
from shared.service_args import add_redis_args, redis_config, run_main, set_threads
from shared.types.config import DTYPES, NUMERICS, ModelArch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m draft_worker")
    add_redis_args(p)
    p.add_argument("--model", default="smollm2-135m", help="the target (the draft must share its tokenizer)")
    p.add_argument("--draft", default="ngram", help="draft model name/path, or 'ngram'")
    p.add_argument("--name", default="")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the draft model's dtype (bfloat16 stays lossless: the target verifies every token)")
    p.add_argument("--numerics", choices=NUMERICS, default="exact",
                   help="the draft's kernels (fast stays lossless too: the target verifies every token)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def serve() -> None:
        set_threads(args.threads)
        cfg = DraftServiceConfig(redis_config(args), args.name)
        target = ModelArch.from_model_dir(resolve_model(args.model))
        DraftService(cfg, load_draft(args.draft, target, None, getattr(torch, args.dtype), args.numerics)).run()

    return run_main(serve)

if __name__ == "__main__":
    raise SystemExit(main())
