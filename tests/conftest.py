"""Shared fixtures: real models from PyPI packages, resolved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model_store import resolve_model

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return resolve_model("smollm2-135m")
