"""OpenAI's response_format -> an llguidance grammar (JSON text); torch-free, so the gateway checks it too.

llguidance (https://github.com/guidance-ai/llguidance) compiles JSON schemas lazily: no per-schema compile step,
a token mask in tens of microseconds, and rollback of consumed tokens, which a token tree needs at every node.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import llguidance

from shared.types.errors import ConfigError, RequestError

# compact JSON: a free-whitespace grammar lets a small model pad forever
JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_of(response_format: dict[str, Any] | None) -> str | None:
    """The grammar for {"type": "text" | "json_object" | "json_schema", ...}; None for text; ConfigError if bad."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ConfigError("response_format.json_schema must be an object with a `schema` object")
        schema = spec.get("schema", {})
    else:
        raise ConfigError(f"response_format type '{kind}': choose text, json_object or json_schema")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as exc:  # not a JSON object, or one the compiler cannot take
        raise ConfigError(f"response_format: {exc}") from exc
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ConfigError(f"response_format: the schema is not usable: {error}")
    return grammar


class Grammars:
    """llguidance matchers for one model's tokenizer (read on first use: most requests have no grammar). The
    gateway checks a request's grammar with it before queueing it; the last stage masks with its matchers
    (shared/compute/grammar.py)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: tuple[int, ...]):
        self.path, self.vocab_size, self.eos_ids = Path(tokenizer_json), vocab_size, eos_ids

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(self.path.read_text(), n_vocab=self.vocab_size,
                                      eos_token=list(self.eos_ids) or None)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher at the start of the output; RequestError if this tokenizer cannot take the grammar (what
        validate_grammar cannot see without one: special tokens, token ranges)."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"grammar refused: {matcher.get_error()}")
        return matcher

    def check(self, grammar: str) -> None:
        """Build the grammar's matcher and its first token mask, as the last stage will: RequestError if either
        fails, or if the grammar allows no token at all."""
        matcher = self.matcher(grammar)
        allowed = any(matcher.compute_logit_bias())
        if matcher.is_error():
            raise RequestError(f"grammar refused: {matcher.get_error()}")
        if not allowed:
            raise RequestError("grammar refused: it allows no token at the start of the output")
