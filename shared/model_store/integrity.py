"""Checking files against a recorded size and sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.model_store.catalogue import ModelError

CHUNK = 1 << 20  # bytes read at a time when hashing or copying


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(
    path: Path,
    expected_size: int | None,
    expected_sha256: str,
    *,
    actual_sha256: str | None = None,
    remedy: str | None = None,
    remove: bool = True,
    label: str | None = None,
) -> None:
    """Raise :class:`ModelError` unless ``path`` has the expected size and sha256.

    ``actual_sha256`` skips re-reading a file already hashed while written.  A
    bad file is deleted when ``remove`` is true; ``label`` names it in the message.
    """
    size = path.stat().st_size
    got = actual_sha256 or file_sha256(path)
    if got == expected_sha256 and (expected_size is None or size == expected_size):
        return
    if remove:
        path.unlink(missing_ok=True)
    detail = f"expected sha256 {expected_sha256}, got {got}"
    if expected_size is not None and size != expected_size:
        detail += f" (expected {expected_size} bytes, got {size})"
    raise ModelError(f"corrupt download for {label or path.name}: {detail}; {remedy or f'delete {path} and retry'}")
