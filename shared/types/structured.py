"""OpenAI's response_format -> an llguidance grammar (JSON text); torch-free, so the gateway checks it too.

llguidance (https://github.com/guidance-ai/llguidance) compiles JSON schemas lazily: no per-schema compile step,
a token mask in tens of microseconds, and rollback of consumed tokens, which a token tree needs at every node.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from shared.types.errors import ConfigError

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
