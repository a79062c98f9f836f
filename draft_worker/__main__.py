"""python -m draft_worker: a speculative source process (draft model or n-grams), on one device (--device)."""

from __future__ import annotations

import argparse

from draft_worker.load import load_draft
from draft_worker.service import DraftService, DraftServiceConfig
from shared.model_store import resolve_model
from shared.service_args import (
    add_device_args,
    add_realtime_args,
    add_redis_args,
    compute_device,
    compute_dtype,
    redis_config,
    run_main,
    set_realtime,
    set_threads,
)
from shared.types.config import DEFAULT_NUMERICS, DRAFT_VOCAB_HELP, DTYPES, NGRAM_SHARED_HELP, NUMERICS, ModelArch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m draft_worker")
    add_redis_args(p)
    add_realtime_args(p)
    p.add_argument("--model", default="smollm2-135m", help="the target (the draft must share its tokenizer)")
    p.add_argument("--draft", default="ngram", help="draft model name/path, or 'ngram'")
    p.add_argument("--name", default="")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the draft model's dtype (default: bfloat16 on a GPU, float32 on a CPU; any dtype stays "
                        "lossless: the target verifies every token)")
    p.add_argument("--numerics", choices=NUMERICS, default=DEFAULT_NUMERICS,
                   help="the draft's kernels (fast stays lossless too: the target verifies every token)")
    p.add_argument("--vocab", type=int, default=0, help=DRAFT_VOCAB_HELP)
    p.add_argument("--ngram-shared", type=int, default=0, help=NGRAM_SHARED_HELP)
    add_device_args(p)  # a bare cuda: LOCAL_RANK's GPU, else GPU 0
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def serve() -> None:
        set_realtime(args.realtime_priority)  # before any thread starts: threads inherit it
        set_threads(args.threads)
        cfg = DraftServiceConfig(redis_config(args), args.name)
        target = ModelArch.from_model_dir(resolve_model(args.model))
        device = "cpu" if args.draft == "ngram" else compute_device(args)  # n-gram lookup takes no GPU
        dtype = compute_dtype(args.dtype, device)
        draft = load_draft(args.draft, target, None, dtype, args.numerics, device=device, vocab=args.vocab,
                           ngram_shared=args.ngram_shared)
        DraftService(cfg, draft).run()

    return run_main(serve)

if __name__ == "__main__":
    raise SystemExit(main())
