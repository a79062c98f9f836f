"""python -m gateway.batch_worker: the Celery worker that runs batch jobs (one batch at a time, solo pool).

Takes the gateway's flags (the model for tokenizing, the Redis URL and prefix of
the cluster, --stages, --request-timeout, ...) plus a few of its own; equivalent to
`celery -A gateway.batch_tasks worker --pool solo --concurrency 1 -Q {prefix}-batches`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from gateway.__main__ import config_from_args
from gateway.__main__ import parser as gateway_parser


def _add_own(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--inflight", type=int, default=8, help="requests of one batch in the pipeline at once")
    p.add_argument("--lease-ttl", type=float, default=10.0,
                   help="seconds after a worker dies before another takes over its batch")
    p.add_argument("--max-attempts", type=int, default=4,
                   help="tries per request on 429/503/504 (backoff 1, 2, 4 s, and a wait for readiness)")
    p.add_argument("--name", default="", help="Celery node name (default batch-PID@host)")
    return p


def parser() -> argparse.ArgumentParser:
    """Every flag the worker accepts (the gateway's and its own)."""
    p = _add_own(gateway_parser())
    p.prog, p.description = "python -m gateway.batch_worker", "Celery worker for batch jobs"
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser().parse_args(argv)  # --help, and an unknown flag is an error here
    own, rest = _add_own(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    cfg, log_level = config_from_args(rest)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from gateway.batch_runner import RunnerConfig
    from gateway.batch_tasks import app, queue_name, set_runner_config
    from shared.errors import SpecPipeError
    from shared.model_store import resolve_model

    try:
        resolve_model(cfg.model, fetch=False)  # the tokenizer must be there: fail now, not in the first task
    except (SpecPipeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    set_runner_config(RunnerConfig(cfg, inflight=own.inflight, lease_ttl_s=own.lease_ttl,
                                   max_attempts=own.max_attempts))
    name = own.name or f"batch-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "-Q", queue_name(cfg.prefix), "-n", name,
                     "--loglevel", log_level.upper(), "--without-gossip", "--without-mingle"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
