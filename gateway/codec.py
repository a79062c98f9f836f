"""Text <-> token ids without torch or transformers: `tokenizers` plus a jinja2 chat template.

The chat template is rendered the way transformers' apply_chat_template renders
it (sandboxed environment, trim_blocks, lstrip_blocks, loopcontrols, a
raise_exception global, a non-escaping tojson, the special tokens of
tokenizer_config.json as variables) and the result is tokenized without adding
special tokens, so the ids equal
AutoTokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from shared.model_store import eos_token_ids
from shared.types.structured import Grammars

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TemplateError(ValueError):
    """The chat template refused the messages (raise_exception) or failed to render."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in an environment like transformers' own."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _model_vocab_size(model_dir: Path, tokenizer_size: int) -> int:
    """config.json's vocab_size (the logits' width), at least the tokenizer's."""
    try:
        size = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        size = None
    return max(size, tokenizer_size) if isinstance(size, int) else tokenizer_size


class TextCodec:
    """One model's tokenizer, chat template and stop ids (no I/O; a long prompt takes CPU time, so the
    routes call encode / encode_chat in a worker thread)."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok_cfg_path = model_dir / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
        self.special_tokens = {k: _token_text(tok_cfg.get(k)) for k in _SPECIAL_KEYS}
        source = self._template_source(model_dir, tok_cfg)
        self.template = compile_template(source) if source else None
        self.eos_ids = tuple(eos_token_ids(model_dir))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        # response_format's grammars, built against this tokenizer as the last stage builds them (its vocabulary:
        # the model's, which may be padded past the tokenizer's)
        self.grammars = Grammars(model_dir / "tokenizer.json", _model_vocab_size(model_dir, self.vocab_size),
                                 self.eos_ids)

    @staticmethod
    def _template_source(model_dir: Path, tok_cfg: dict[str, Any]) -> str | None:
        path = model_dir / "chat_template.jinja"
        if path.exists():
            return path.read_text()
        source = tok_cfg.get("chat_template")
        return source if isinstance(source, str) else None

    def encode(self, text: str) -> list[int]:
        """A plain prompt, with the tokenizer's own special tokens (as a transformers tokenizer call).
        encode_batch, unlike encode, releases the GIL: a long prompt in a worker thread does not stall
        the event loop."""
        return self.tokenizer.encode_batch([text], add_special_tokens=True)[0].ids

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat template applied to messages, ending with the assistant's generation prompt."""
        if self.template is None:
            raise TemplateError("this model has no chat template; use /v1/completions")
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(str(exc)) from exc

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenizer.encode_batch([self.render_chat(messages)], add_special_tokens=False)[0].ids

    def token_text(self, token: int) -> str:
        """One token as text, special tokens included (logprobs' `token`)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Output text: special tokens skipped (vLLM's default), a trailing eos removed."""
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)
