"""``specpipe models``: fetch a known model into the cache, or list the known models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.model_store.catalogue import KNOWN_MODELS, ModelError, is_complete, model_dir
from shared.model_store.fetch import fetch_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specpipe models", description="Fetch and list known models.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch/convert a known model into the cache")
    fetch.add_argument("name", help=f"one of: {', '.join(KNOWN_MODELS)}")
    listing = sub.add_parser("list", help="list known models and whether they are cached")
    for p in (fetch, listing):
        p.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/specpipe/models")
    return parser


def _list_models(cache: Path | None) -> None:
    for spec in KNOWN_MODELS.values():
        folder = model_dir(spec.name, cache)
        state = f"cached at {folder}" if is_complete(folder, spec) else "not cached"
        print(f"{spec.name:20s} {state}\n{'':20s} {spec.description}")


def models_main(argv: list[str]) -> int:
    """``specpipe models fetch NAME [--cache-dir DIR]`` / ``specpipe models list``; returns an exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage or help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "list":
            _list_models(args.cache_dir)
        else:
            print(fetch_model(args.name, args.cache_dir, progress=True))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
