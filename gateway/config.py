"""GatewayConfig: everything the gateway process needs, frozen, built once at start-up, and the command line
that builds it (`python -m gateway`; the batch worker takes the same flags and a few of its own).

Environment (shared/environment.py; read when a parser is built, never at import time): REDIS_URL,
SPECPIPE_PREFIX, SPECPIPE_API_KEYS (comma-separated), SPECPIPE_STAGES.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.environment import env
from shared.transport.redis_io import RedisConfig
from shared.types.errors import SpecPipeError

STARTUP_ERRORS = (SpecPipeError, OSError, ValueError)  # e.g. a model not in the cache: one line, exit status 2


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
    max_file_bytes: int = 64 << 20  # 64 MiB: gateway/batches/input.py's MAX_FILE_BYTES
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The gateway's flags; their environment defaults are read now."""
    p = argparse.ArgumentParser(prog="python -m gateway", description="OpenAI-compatible gateway")
    p.add_argument("--redis-url", default=env("REDIS_URL"))
    p.add_argument("--prefix", default=env("SPECPIPE_PREFIX"), help="key prefix of the cluster")
    p.add_argument("--model", default="smollm2-135m", help="model name or local Hugging Face folder")
    p.add_argument("--served-model-name", default="", help="the name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--stages", type=int, default=int(env("SPECPIPE_STAGES")), help="stage heartbeats /ready requires")
    p.add_argument("--api-keys", default=env("SPECPIPE_API_KEYS"), help="comma-separated")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before 504 (and cancel)")
    p.add_argument("--max-model-len", type=int, default=0, help="context length (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--attention", choices=("exact", "distr"), default="exact",
                   help="the stages' prefill attention; distr (approximate) is reported in every reply")
    p.add_argument("--max-inflight", type=_positive, default=256,
                   help="generation requests (queued + running) this gateway takes at once; past it 429 with "
                        "Retry-After at once (default 256)")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20,
                   help="largest request body in bytes; larger ones get 413 (default 1048576 = 1 MiB)")
    p.add_argument("--max-file-bytes", type=_positive, default=64 << 20,
                   help="largest batch input file for POST /v1/files in bytes (its own limit: batch files are "
                        "bigger than requests; the batch format allows at most 64 MiB, the default)")
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The GatewayConfig of parsed flags (parser()'s, or a parser that extends it)."""
    keys = tuple(k.strip() for k in args.api_keys.split(",") if k.strip())
    return GatewayConfig(
        model=args.model, redis_url=args.redis_url, prefix=args.prefix, host=args.host, port=args.port,
        api_keys=keys, request_timeout_s=args.request_timeout, max_prompt_tokens=args.max_model_len,
        default_max_tokens=args.default_max_tokens, served_model_name=args.served_model_name, stages=args.stages,
        attention=args.attention, max_inflight=args.max_inflight, max_body_bytes=args.max_body_bytes,
        max_file_bytes=args.max_file_bytes,
    )


def start(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, GatewayConfig]:
    """How both entry points (gateway, batch worker) begin: parse the flags, set up logging."""
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args, config_from_args(args)


def startup_failed(exc: Exception) -> int:
    """One of STARTUP_ERRORS: its message on stderr, no traceback; the exit status."""
    print(f"error: {exc}", file=sys.stderr)
    return 2
