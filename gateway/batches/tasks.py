"""Batch jobs on Celery: the app (Redis broker and result backend) and the `run_batch` task.

`make_celery(cfg)` builds the app for one cluster (nothing is built or read at import): the
gateway sends tasks with it (`enqueue`); the batch worker, `python -m gateway.batches.worker`
(what `specpipe up` and docker-compose start), adds the task and the resume-on-start hook to its
own app with `add_worker_tasks` and runs it (`app.worker_main`). There is no module-level app for
Celery's own `celery -A ... worker` to load: workers start through that module.

Delivery: tasks are acknowledged late (after they return) and rejected back to
the queue if the worker is lost, so a batch whose worker died is redelivered
after the broker's visibility timeout; sooner than that, every worker that
starts re-enqueues the unfinished batches it finds (worker_ready), and a task
that finds another runner's lease still alive retries once it can expire. Every
run is idempotent (gateway/batches/runner.py), so duplicates only cost a look-up.
All Celery keys live under `{prefix}:celery:`, next to the cluster's own.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from celery import Celery
from celery.signals import worker_ready

from gateway.batches.runner import LeaseBusy, RunnerConfig, run_batch
from gateway.batches.store import ACTIVE, BatchStore
from gateway.config import GatewayConfig

log = logging.getLogger("gateway.batch")
TASK = "specpipe.run_batch"
VISIBILITY_TIMEOUT_S = 3600


def queue_name(prefix: str) -> str:
    return f"{prefix}-batches"


def make_celery(cfg: GatewayConfig) -> Celery:
    """A Celery app for cfg's cluster: broker and result backend on its Redis, keys under its prefix."""
    app = Celery("specpipe_batches", set_as_current=False)
    keys = {"global_keyprefix": f"{cfg.prefix}:celery:"}
    app.conf.update(
        broker_url=cfg.redis_url, result_backend=cfg.redis_url, task_default_queue=queue_name(cfg.prefix),
        broker_transport_options={**keys, "visibility_timeout": VISIBILITY_TIMEOUT_S},
        result_backend_transport_options=keys, result_expires=7 * 86400,
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        broker_connection_retry_on_startup=True, broker_connection_timeout=5, worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def enqueue(app: Celery, batch_id: str, **options) -> None:
    """Send one batch's task to the cluster's batch queue (options: send_task's, e.g. countdown, retry)."""
    app.send_task(TASK, args=[batch_id], queue=app.conf.task_default_queue, **options)


def add_worker_tasks(app: Celery, runner: RunnerConfig) -> Celery:
    """The worker's side of `app`: the `run_batch` task and the resume-on-start hook, both running with
    `runner`'s settings."""

    @app.task(name=TASK, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def run_batch_task(self, batch_id: str) -> str:
        """Run (or resume) one batch to a terminal status; retried while another runner holds it."""
        try:
            return asyncio.run(run_batch(runner, batch_id))
        except LeaseBusy as busy:
            raise self.retry(countdown=busy.retry_in_s) from None

    def resume_unfinished(sender=None, **_) -> None:
        """A starting worker re-enqueues unfinished batches (a dead worker's batch resumes without waiting for
        the broker's visibility timeout); a batch whose runner is alive sees the lease and its task retries."""
        if getattr(sender, "app", app) is not app:
            return
        try:
            found = asyncio.run(unfinished(runner.gateway))
        except Exception:
            log.exception("could not scan for unfinished batches")
            return
        for batch_id, lease_s in found:
            log.info("resuming batch %s (lease free in %.1f s)", batch_id, lease_s)
            enqueue(app, batch_id, countdown=lease_s + 0.5 if lease_s else None)

    worker_ready.connect(resume_unfinished, weak=False)  # a closure: nothing else holds it
    return app


async def unfinished(cfg: GatewayConfig) -> list[tuple[str, float]]:
    """(batch id, seconds until its lease can have expired) for every batch not in a terminal status."""
    r = aioredis.Redis.from_url(cfg.redis_url)
    try:
        store, out = BatchStore(r, cfg.prefix), []
        for batch_id in await store.list_batches(10_000):
            if await store.status(batch_id) in ACTIVE:
                out.append((batch_id, max(await store.lease_ttl_ms(batch_id), 0) / 1000))
        return out
    finally:
        await r.aclose()
