"""python -m gateway: the OpenAI-compatible HTTP gateway (uvicorn, loopback unless --host is given).

Environment (read here, at start-up): REDIS_URL, SPECPIPE_PREFIX, SPECPIPE_API_KEYS
(comma-separated), SPECPIPE_STAGES.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gateway.config import GatewayConfig
from shared.errors import SpecPipeError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="OpenAI-compatible gateway")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--prefix", default=os.environ.get("SPECPIPE_PREFIX", "specpipe"), help="key prefix of the cluster")
    p.add_argument("--model", default="smollm2-135m", help="model name or local Hugging Face folder")
    p.add_argument("--served-model-name", default="", help="the name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--stages", type=int, default=int(os.environ.get("SPECPIPE_STAGES", "2")),
                   help="stage heartbeats /ready requires")
    p.add_argument("--api-keys", default=os.environ.get("SPECPIPE_API_KEYS", ""), help="comma-separated")
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


def config_from_args(argv: list[str] | None = None) -> tuple[GatewayConfig, str]:
    a = parser().parse_args(argv)
    keys = tuple(k.strip() for k in a.api_keys.split(",") if k.strip())
    return GatewayConfig(
        model=a.model, redis_url=a.redis_url, prefix=a.prefix, host=a.host, port=a.port, api_keys=keys,
        request_timeout_s=a.request_timeout, max_prompt_tokens=a.max_model_len,
        default_max_tokens=a.default_max_tokens, served_model_name=a.served_model_name, stages=a.stages,
        attention=a.attention, max_inflight=a.max_inflight, max_body_bytes=a.max_body_bytes,
        max_file_bytes=a.max_file_bytes,
    ), a.log_level


def main(argv: list[str] | None = None) -> int:
    cfg, log_level = config_from_args(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from gateway.app import create_app

    try:
        app = create_app(cfg)
    except (SpecPipeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level.lower(), timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
