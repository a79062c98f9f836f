"""python -m gateway.batches.worker: the Celery worker that runs batch jobs (one batch at a time, solo pool).

Takes the gateway's flags (the model for tokenizing, the Redis URL and prefix of
the cluster, --stages, --request-timeout, ...; gateway/config.py) plus a few of its
own. --model defaults to SPECPIPE_MODEL (shared/environment.py). Runs the Celery app
of gateway/batches/tasks.py as `worker --pool solo --concurrency 1 -Q {prefix}-batches`.
"""

from __future__ import annotations

import argparse
import os
import socket

from gateway.config import STARTUP_ERRORS, start, startup_failed
from gateway.config import parser as gateway_parser
from shared.environment import env


def parser() -> argparse.ArgumentParser:
    """Every flag the worker accepts (the gateway's and its own); environment defaults are read now."""
    p = gateway_parser()
    p.prog, p.description = "python -m gateway.batches.worker", "Celery worker for batch jobs"
    p.set_defaults(model=env("SPECPIPE_MODEL"))
    p.add_argument("--inflight", type=int, default=8, help="requests of one batch in the pipeline at once")
    p.add_argument("--lease-ttl", type=float, default=10.0,
                   help="seconds after a worker dies before another takes over its batch")
    p.add_argument("--max-attempts", type=int, default=4,
                   help="tries per request on 429/503/504 (backoff 1, 2, 4 s, and a wait for readiness)")
    p.add_argument("--name", default="", help="Celery node name (default batch-PID@host)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, cfg = start(parser(), argv)
    from gateway.batches.runner import RunnerConfig
    from gateway.batches.tasks import add_worker_tasks, make_celery, queue_name
    from shared.model_store import resolve_model

    try:
        resolve_model(cfg.model, fetch=False)  # the tokenizer must be there: fail now, not in the first task
    except STARTUP_ERRORS as exc:
        return startup_failed(exc)
    runner = RunnerConfig(cfg, inflight=args.inflight, lease_ttl_s=args.lease_ttl, max_attempts=args.max_attempts)
    app = add_worker_tasks(make_celery(cfg), runner)
    name = args.name or f"batch-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "-Q", queue_name(cfg.prefix), "-n", name,
                     "--loglevel", args.log_level.upper(), "--without-gossip", "--without-mingle"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
