"""python -m stage_worker --rank k --world N: one pipeline stage process, on one device (--device)."""

from __future__ import annotations

import argparse

from shared.compute.runner import load_stage
from shared.environment import env
from shared.model_store import resolve_model
from shared.service_args import (
    add_attention_args,
    add_control_args,
    add_device_args,
    add_model_args,
    add_realtime_args,
    add_redis_args,
    attention_config,
    compute_device,
    compute_dtype,
    control_config,
    redis_config,
    run_main,
    set_realtime,
    set_threads,
)
from shared.types.config import LAYER_SPLIT_HELP, ModelArch
from stage_worker.link import LinkConfig
from stage_worker.null_runner import NullRunner
from stage_worker.service import StageService, StageServiceConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stage_worker")
    add_redis_args(p)
    add_control_args(p)
    add_realtime_args(p)
    add_model_args(p)
    add_attention_args(p)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True, help="number of stages")
    p.add_argument("--master-addr", default=env("MASTER_ADDR"))
    p.add_argument("--master-port", type=int, default=int(env("MASTER_PORT")),
                   help="stage 0's rendezvous port (0: a free one per pipeline run, shared through Redis)")
    p.add_argument("--layer-split", default="balanced", help=LAYER_SPLIT_HELP)
    add_device_args(p)
    p.add_argument("--null-compute-ms", type=float, default=None,
                   help="benchmarks only (benchmarks.beat): no model, every forward takes this long and outputs "
                        "nothing meaningful")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds (tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def serve() -> None:
        set_realtime(args.realtime_priority)  # before any thread starts: threads inherit it
        attention = attention_config(args)
        set_threads(args.threads)
        redis_cfg = redis_config(args)
        model_dir = resolve_model(args.model)
        arch = ModelArch.from_model_dir(model_dir)
        device = compute_device(args, rank=args.rank)  # a bare cuda: LOCAL_RANK's GPU, else the rank's
        dtype = compute_dtype(args.dtype, device)
        if args.null_compute_ms is not None:
            runner = NullRunner(arch, args.rank, args.world, args.null_compute_ms, dtype)
        else:
            runner = load_stage(model_dir, arch, args.rank, args.world, dtype, attention, args.numerics, device,
                                args.layer_split)
        link = (LinkConfig(args.rank, args.world, args.master_addr, args.master_port, host=args.control_host)
                if args.world > 1 else None)
        cfg = StageServiceConfig(args.rank, args.world, redis_cfg, link, control=control_config(args))
        StageService(cfg, runner).run(args.idle_exit)

    return run_main(serve)

if __name__ == "__main__":
    raise SystemExit(main())
