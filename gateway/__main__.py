"""python -m gateway: the OpenAI-compatible HTTP gateway (uvicorn, loopback unless --host is given).

Flags and their environment defaults: gateway/config.py.
"""

from __future__ import annotations

from gateway.config import STARTUP_ERRORS, parser, start, startup_failed


def main(argv: list[str] | None = None) -> int:
    args, cfg = start(parser(), argv)
    import uvicorn

    from gateway.app import create_app

    try:
        app = create_app(cfg)
    except STARTUP_ERRORS as exc:
        return startup_failed(exc)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
