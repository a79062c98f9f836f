"""python -m scheduler: the SpecPipe-DB scheduler process."""

from __future__ import annotations

import argparse
from dataclasses import replace

from scheduler.admission import AdmissionConfig
from scheduler.scheduler import Scheduler
from scheduler.service import SchedulerService, SchedulerServiceConfig
from shared.drafting.ngram import NgramSource
from shared.model_store import resolve_model
from shared.service_args import (
    add_control_args,
    add_model_args,
    add_policy_args,
    add_realtime_args,
    add_redis_args,
    control_config,
    engine_config,
    policy_config,
    redis_config,
    run_main,
    set_realtime,
)
from shared.types.config import DRAFT_MODES, NGRAM_SHARED_HELP, ModelArch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scheduler")
    add_redis_args(p)
    add_control_args(p)
    add_realtime_args(p)
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--kv-slots", type=int, default=1 << 16)
    p.add_argument("--draft-mode", choices=tuple(DRAFT_MODES), default="auto",
                   help="wait: each step waits (bounded) for the level drafted meanwhile and a refill's levels; "
                        "beside: never (a level enters once drafted, the width plan prices the draft's pace); "
                        "auto: the width plan chooses, plan by plan, from the measured costs (cost rule)")
    p.add_argument("--draft-wait-ms", type=float, default=1000.0,
                   help="a waiting step waits up to this long for the draft's proposals (0: --draft-mode beside)")
    p.add_argument("--local-draft", choices=("none", "ngram"), default="none",
                   help="ngram: the prompt-lookup draft answered in this process, with no draft worker (a lookup "
                        "computes nothing: a worker would add only its round trips); none: the draft workers'")
    p.add_argument("--ngram-shared", type=int, default=0, help=f"--local-draft ngram: {NGRAM_SHARED_HELP}")
    p.add_argument("--trace-steps", action="store_true",
                   help="also write every StepMsg to the Redis `steps` stream, off the beat (tests, debugging)")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds (tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def serve() -> None:
        set_realtime(args.realtime_priority)  # before any thread starts: threads inherit it
        arch = ModelArch.from_model_dir(resolve_model(args.model))
        waits = DRAFT_MODES[args.draft_mode] if args.draft_wait_ms > 0 else False  # a wait of 0: never wait
        policy = replace(policy_config(args), draft_waits=waits)
        scheduler = Scheduler(policy, engine_config(args), context_limit=arch.max_positions)
        cfg = SchedulerServiceConfig(redis_config(args), args.stages, AdmissionConfig(args.max_queue, args.kv_slots),
                                     draft_wait_s=0.0 if waits is False else args.draft_wait_ms / 1000,
                                     control=control_config(args),
                                     trace_steps=args.trace_steps)
        local = NgramSource(shared_tokens=args.ngram_shared) if args.local_draft == "ngram" else None
        SchedulerService(cfg, scheduler, frozenset(arch.eos_token_ids), local).run(args.idle_exit)

    return run_main(serve)

if __name__ == "__main__":
    raise SystemExit(main())
