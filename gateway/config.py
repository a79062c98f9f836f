"""GatewayConfig: everything the gateway process needs, frozen, built once at start-up."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from shared.redis_io import RedisConfig


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's settings.

    model: a model name known to shared.model_store or a local Hugging Face folder.
    api_keys: accepted bearer keys; empty means no authentication.
    max_prompt_tokens: the model's context (prompt + max_tokens must fit); 0 = read
        max_position_embeddings from the model's config.json (see `resolved`).
    stages: pipeline stages whose heartbeats /ready (and submission) require.
    max_inflight: this gateway's generation requests at once (queued + running); past it, 429 at once.
    max_body_bytes: the largest request body (413 above it); max_file_bytes: the same for POST /v1/files
        (a batch input file may hold up to 64 MiB, so uploads get their own, larger limit).
    redis_pool_size: connections for the gateway's short Redis calls (callers wait for a free one);
        the out streams of every in-flight request are read by one more connection (gateway/outstreams.py).
    """

    model: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "specpipe"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    request_timeout_s: float = 600.0
    max_prompt_tokens: int = 0
    default_max_tokens: int = 256
    served_model_name: str = ""
    stages: int = 2
    retry_after_s: int = 1  # Retry-After on 429 (scheduler queue full, or max_inflight reached)
    record_limit: int = 10_000  # requests remembered for GET /v1/requests/{id}
    out_stream_ttl_s: int = 3600  # a finished request's out stream expires after this
    attention: str = "exact"  # the stages' prefill attention ("distr" is approximate: the API says so)
    max_inflight: int = 256
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_file_bytes: int = 64 << 20  # 64 MiB: gateway/batch_input.py's MAX_FILE_BYTES
    redis_pool_size: int = 16

    @property
    def exact_output(self) -> bool:
        """False when an approximate attention backend makes outputs differ from exact decoding."""
        return self.attention == "exact"

    @property
    def redis(self) -> RedisConfig:
        return RedisConfig(url=self.redis_url, prefix=self.prefix)

    @property
    def model_name(self) -> str:
        """The name clients use in `model` (the --model value unless --served-model-name is given)."""
        return self.served_model_name or self.model

    def resolved(self, model_dir: Path) -> "GatewayConfig":
        """A copy with max_prompt_tokens read from the model's config.json when it is 0."""
        if self.max_prompt_tokens > 0:
            return self
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return dataclasses.replace(self, max_prompt_tokens=int(cfg.get("max_position_embeddings", 2048)))

