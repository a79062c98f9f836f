"""Command-line arguments shared by the service entry points.

Environment variables: shared/environment.py (read when a parser is built, never at import time).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.environment import env
from shared.transport.control import ControlConfig
from shared.transport.redis_io import RedisConfig
from shared.types.config import (
    ATTENTION_KINDS,
    DEFAULT_NUMERICS,
    DISTR_BUCKETS,
    DISTR_FUSES,
    DISTR_LAYOUTS,
    DTYPES,
    NUMERICS,
    NUMERICS_HELP,
    POLICIES,
    WIDTH_RULES,
    AttentionConfig,
    EngineConfig,
    PolicyConfig,
    default_refill_depth,
)
from shared.types.errors import ConfigError, SpecPipeError
from shared.types.layer_spec import LAYERS_HELP

if TYPE_CHECKING:
    import torch


def add_redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=env("REDIS_URL"))
    p.add_argument("--prefix", default=env("SPECPIPE_PREFIX"), help="key prefix of this cluster")
    p.add_argument("--log-level", default="INFO")


def add_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control-host", default=env("SPECPIPE_CONTROL_HOST"),
                   help="the address this process's control inbox binds, as its peers reach it (loopback by default; "
                        "on a multi-host pipeline, this host's address on the stages' network)")
    p.add_argument("--control-port", type=int, default=0,
                   help="the control inbox's port (0: a free one, published through Redis; fix it for a firewall)")


def control_config(args: argparse.Namespace) -> ControlConfig:
    return ControlConfig(host=args.control_host, port=args.control_port)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name or local Hugging Face folder")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights, activations and KV (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--numerics", default=DEFAULT_NUMERICS, choices=NUMERICS,
                   help=NUMERICS_HELP)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device of a compute process (a stage or a draft worker): one device per process."""
    import torch

    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda (the GPU of LOCAL_RANK, else of the stage's rank) or cuda:N "
                        "(default: cuda when this process sees a GPU, else cpu)")


def compute_device(args: argparse.Namespace, rank: int = 0) -> torch.device:
    """args.device as a torch.device, made current when it is a GPU (a bare cuda: LOCAL_RANK's GPU, else rank's);
    ConfigError when it is not there."""
    from shared.compute.device import resolve_device

    local_rank = env("LOCAL_RANK")
    if local_rank and not local_rank.isdigit():
        raise ConfigError(f"LOCAL_RANK '{local_rank}': expected a GPU index")
    return resolve_device(args.device, int(local_rank) if local_rank else rank)


def compute_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """--dtype as a torch.dtype: the one named, else the device's default (bfloat16 on a GPU, float32 on a CPU)."""
    from shared.compute.device import check_dtype, default_dtype

    return check_dtype(name or default_dtype(device))


def add_attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", choices=ATTENTION_KINDS, default="exact",
                   help="prefill attention: exact (lossless) or distr (DistrAttention, approximate)")
    p.add_argument("--group-size", type=int, default=2, help="distr: Q columns fused per group (divides head dim)")
    p.add_argument("--block-rows", type=int, default=AttentionConfig.block_rows,
                   help="distr: query rows sharing one column grouping")
    p.add_argument("--distr-layers", default=AttentionConfig.layers,
                   help=f"distr: the layers that use it (others exact): {LAYERS_HELP}; default "
                        f"{AttentionConfig.layers}, the setting that keeps perplexity within 2%% of exact")
    p.add_argument("--distr-layout", choices=DISTR_LAYOUTS, default=AttentionConfig.layout,
                   help="distr: group j = sorted columns {j + t*d/G} (strided, the authors') or G adjacent ones")
    p.add_argument("--distr-fuse", choices=DISTR_FUSES, default=AttentionConfig.fuse,
                   help="distr: Q'/K' per group, mean/sum (mean_sum) or sum/one column (sum_one)")
    p.add_argument("--distr-bucket", choices=DISTR_BUCKETS, default=AttentionConfig.bucket,
                   help="distr: sort columns by the Gray code of their SimHash (gray) or by the hash (binary)")


def attention_config(args: argparse.Namespace) -> AttentionConfig:
    """Raises ConfigError on bad values (run_main turns it into one line)."""
    return AttentionConfig(args.attention, group_size=args.group_size, block_rows=args.block_rows,
                           bucket=args.distr_bucket, layout=args.distr_layout, fuse=args.distr_fuse,
                           layers=args.distr_layers)


def set_threads(threads: int) -> None:
    """Several compute processes on one host must share the cores, not each take all of them."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def add_realtime_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, who: str = "this process") -> None:
    p.add_argument("--realtime-priority", type=int, default=0, choices=range(100), metavar="0-99",
                   help=f"run {who} under SCHED_FIFO at this priority (0: off, the default): a process then takes a "
                        "core as soon as its input arrives, which holds the beat's p99 where the pipeline's processes "
                        "share cores. Needs CAP_SYS_NICE (else a warning, and normal priority). For compute on a GPU "
                        "with a core per process: a FIFO process computing on the CPU keeps others off its core")


def set_realtime(priority: int) -> None:
    """Take SCHED_FIFO at `priority` (0: leave the scheduling as it is). Called before the process starts threads,
    which inherit it. Where it is not allowed the process says so once and runs at normal priority: the flag buys
    latency, and refusing to serve over it would cost more."""
    if priority <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        logging.getLogger("specpipe").warning(
            "--realtime-priority %d: SCHED_FIFO not allowed (needs CAP_SYS_NICE or an rtprio limit); running at "
            "normal priority", priority)


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=POLICIES, default="specpipe")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--refill-depth", type=int, default=None, help="default: stages - 1, and 2 at least")
    p.add_argument("--branch", type=int, default=4)
    p.add_argument("--width-rule", choices=WIDTH_RULES, default="cost", help="specpipe: cost (default) sizes each request's tree width per step from its measured acceptance and "
                        "the measured step cost, down to 0 (as pp) under saturation; budget keeps --width while the "
                        "token budget allows")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="most prompt rows per prefill micro-batch; a shorter prompt goes in one chunk per stage")
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--async-scheduling", action="store_true",
                   help="schedule step t+1 while the stages compute step t, before t's verification is read: "
                        "no step waits for the scheduler, but prunes and refills come one step late (pays where "
                        "the control path is a large share of a step: GPU-sized steps)")


def redis_config(args: argparse.Namespace) -> RedisConfig:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return RedisConfig(url=args.redis_url, prefix=args.prefix)


def policy_config(args: argparse.Namespace) -> PolicyConfig:
    refill = args.refill_depth if args.refill_depth is not None else default_refill_depth(args.stages)
    return PolicyConfig(args.policy, args.stages, args.width, args.depth, refill, args.branch, args.width_rule,
                        async_scheduling=args.async_scheduling)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    # the scheduler computes nothing: its dtype only has to be a valid one
    return EngineConfig(prefill_chunk=args.prefill_chunk, token_budget=args.token_budget,
                        dtype=args.dtype or "float32", numerics=args.numerics)


def run_main(body: Callable[[], None]) -> int:
    """Run a service body: a SpecPipeError is one line on stderr (exit 2), Ctrl-C a clean exit."""
    try:
        body()
    except SpecPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
