"""Prompt sets: JSONL files whose lines carry a `turns` list (first turn is used)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.types.errors import ConfigError

DEFAULT_PROMPTS = (
    "Explain pipeline parallelism in two sentences.",
    "Write a short poem about a busy GPU.",
    "List three uses of speculative decoding.",
)


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str


def read_prompts(path: Path | None, limit: int | None = None) -> list[Prompt]:
    if path is None:
        prompts = [Prompt(f"default-{i}", t) for i, t in enumerate(DEFAULT_PROMPTS)]
    else:
        prompts = list(_read_jsonl(Path(path)))
    return prompts[:limit] if limit else prompts


def _read_jsonl(path: Path):
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read prompt file {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            turns = record["turns"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise TypeError
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{number}: expected a JSON object with a non-empty 'turns' list of strings") from exc
        yield Prompt(str(record.get("question_id", number)), turns[0])


def encode_chat(tokenizer: Any, text: str) -> list[int]:
    """The first turn through the model's chat template, as token ids."""
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(text))
