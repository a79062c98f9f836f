"""Batch jobs on Celery: the app (Redis broker and result backend) and the `run_batch` task.

Run a worker with `python -m gateway.batch_worker` (the gateway's flags; what
`specpipe up` and docker-compose start) or with Celery's own command, configured
from the environment (REDIS_URL, SPECPIPE_PREFIX, SPECPIPE_MODEL, SPECPIPE_STAGES):
    celery -A gateway.batch_tasks worker --pool solo --concurrency 1 -Q specpipe-batches

Delivery: tasks are acknowledged late (after they return) and rejected back to
the queue if the worker is lost, so a batch whose worker died is redelivered
after the broker's visibility timeout; sooner than that, every worker that
starts re-enqueues the unfinished batches it finds (worker_ready), and a task
that finds another runner's lease still alive retries once it can expire. Every
run is idempotent (gateway/batch_runner.py), so duplicates only cost a look-up.
All Celery keys live under `{prefix}:celery:`, next to the cluster's own.
"""

from __future__ import annotations

import asyncio
import logging
import os

from celery import Celery
from celery.signals import worker_ready

from gateway.batch_runner import LeaseBusy, RunnerConfig
from gateway.batch_runner import run_batch as run_batch_async

log = logging.getLogger("gateway.batch")
TASK = "specpipe.run_batch"
VISIBILITY_TIMEOUT_S = 3600


def queue_name(prefix: str) -> str:
    return f"{prefix}-batches"


def configure(app: Celery, redis_url: str, prefix: str) -> Celery:
    """Point `app` at one cluster: broker and result backend on its Redis, keys under its prefix."""
    keys = {"global_keyprefix": f"{prefix}:celery:"}
    app.conf.update(
        broker_url=redis_url, result_backend=redis_url, task_default_queue=queue_name(prefix),
        broker_transport_options={**keys, "visibility_timeout": VISIBILITY_TIMEOUT_S},
        result_backend_transport_options=keys, result_expires=7 * 86400,
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        broker_connection_retry_on_startup=True, broker_connection_timeout=5, worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.update(specpipe_prefix=prefix)
    return app


def make_celery(redis_url: str, prefix: str) -> Celery:
    """A Celery app for one cluster (the gateway uses one to send tasks)."""
    return configure(Celery("specpipe_batches", set_as_current=False), redis_url, prefix)


app = make_celery(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                  os.environ.get("SPECPIPE_PREFIX", "specpipe"))
_runner_cfg: RunnerConfig | None = None


def set_runner_config(cfg: RunnerConfig) -> None:
    """Used by `python -m gateway.batch_worker` before it starts the worker."""
    global _runner_cfg
    _runner_cfg = cfg
    configure(app, cfg.gateway.redis_url, cfg.gateway.prefix)


def runner_config() -> RunnerConfig:
    """The worker's settings: set by the wrapper, else from the environment (the `celery` command)."""
    global _runner_cfg
    if _runner_cfg is None:
        from gateway.__main__ import config_from_args

        cfg, _ = config_from_args(["--model", os.environ.get("SPECPIPE_MODEL", "smollm2-135m")])
        _runner_cfg = RunnerConfig(cfg)
    return _runner_cfg


@app.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_batch(self, batch_id: str) -> str:
    """Run (or resume) one batch to a terminal status; retried while another runner holds it."""
    try:
        return asyncio.run(run_batch_async(runner_config(), batch_id))
    except LeaseBusy as busy:
        raise self.retry(countdown=busy.retry_in_s) from None


async def _unfinished(cfg: RunnerConfig) -> list[tuple[str, float]]:
    """(batch id, seconds until its lease can have expired) for every batch not in a terminal status."""
    import redis.asyncio as aioredis

    from gateway.batch_store import ACTIVE, BatchStore

    r = aioredis.Redis.from_url(cfg.gateway.redis_url)
    try:
        store, out = BatchStore(r, cfg.gateway.prefix), []
        for batch_id in await store.list_batches(10_000):
            if await store.status(batch_id) in ACTIVE:
                out.append((batch_id, max(await store.lease_ttl_ms(batch_id), 0) / 1000))
        return out
    finally:
        await r.aclose()


@worker_ready.connect
def resume_unfinished(sender=None, **_) -> None:
    """A starting worker re-enqueues unfinished batches (a dead worker's batch resumes without waiting for the
    broker's visibility timeout); a batch whose runner is alive sees the lease and its task just retries."""
    if getattr(sender, "app", app) is not app:
        return
    try:
        found = asyncio.run(_unfinished(runner_config()))
    except Exception:
        log.exception("could not scan for unfinished batches")
        return
    for batch_id, lease_s in found:
        log.info("resuming batch %s (lease free in %.1f s)", batch_id, lease_s)
        app.send_task(TASK, args=[batch_id], queue=queue_name(runner_config().gateway.prefix),
                      countdown=lease_s + 0.5 if lease_s else None)
