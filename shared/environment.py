"""The environment variables the project reads, with their defaults: one place.

Read only at start-up, by entry points building their argument parsers (never at import time):
    REDIS_URL          the Redis of the cluster (streams, queue, heartbeats)
    SPECPIPE_PREFIX    the key prefix of the cluster: clusters sharing a Redis use different ones
    SPECPIPE_API_KEYS  the gateway's bearer keys, comma-separated (none: no authentication)
    SPECPIPE_STAGES    the stages whose heartbeats the gateway's /ready requires
    SPECPIPE_CACHE     the model cache folder (shared.model_store)
    SPECPIPE_MODEL     the model a batch worker serves when Celery starts it
    MASTER_ADDR        stage 0's address, as the other stages reach it
    SPECPIPE_CONTROL_HOST  this process's address on the control path (scheduler, stages), as its peers reach it
    MASTER_PORT        stage 0's rendezvous port (0: a free one per pipeline run, shared through Redis)
    LOCAL_RANK         which GPU a bare `--device cuda` means (torchrun sets it; unset: a stage's rank, a draft's 0)
"""

from __future__ import annotations

import os

DEFAULTS = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SPECPIPE_PREFIX": "specpipe",
    "SPECPIPE_API_KEYS": "",
    "SPECPIPE_STAGES": "2",
    "SPECPIPE_CACHE": "",
    "SPECPIPE_MODEL": "smollm2-135m",
    "MASTER_ADDR": "127.0.0.1",
    "SPECPIPE_CONTROL_HOST": "127.0.0.1",
    "MASTER_PORT": "0",
    "LOCAL_RANK": "",
}


def env(name: str) -> str:
    """The variable's value, or its default."""
    return os.environ.get(name) or DEFAULTS[name]
