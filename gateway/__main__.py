"""python -m gateway: the OpenAI-compatible HTTP gateway (uvicorn, loopback unless --host is given).

Flags and their environment defaults: gateway/config.py.
"""

from __future__ import annotations

import logging
import sys

from gateway.config import config_from_args, parser
from shared.types.errors import SpecPipeError

__all__ = ["main", "parser"]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg, log_level = config_from_args(args), args.log_level
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
