"""The grammar's token mask at any tree node (last stage): one llguidance matcher per request, rolled back
to the common prefix of what it consumed and the node's output, then advanced along the node's path.

A node whose drafted path leaves the grammar gets no mask (None): its token is not what the masked target chose
at its parent, so verification prunes it before its own target is ever read.
"""

from __future__ import annotations

import functools
from pathlib import Path

import llguidance
import torch

from shared.types.errors import RequestError


class Grammars:
    """Makes matchers for one model's tokenizer (read on first use: most requests have no grammar)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: tuple[int, ...]):
        self.path, self.vocab_size, self.eos_ids = Path(tokenizer_json), vocab_size, eos_ids

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(self.path.read_text(), n_vocab=self.vocab_size,
                                      eos_token=list(self.eos_ids) or None)

    def matcher(self, grammar: str) -> NodeGrammar:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"grammar refused: {matcher.get_error()}")
        return NodeGrammar(matcher, frozenset(self.eos_ids))


class NodeGrammar:
    """One request's matcher and the output tokens it has consumed. Once the grammar is complete and an
    end-of-sequence token consumed (ignore_eos keeps going), it allows only end-of-sequence tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: frozenset[int]):
        self.matcher, self.eos_ids, self.consumed = matcher, eos_ids, []

    def allowed(self, output: list[int]) -> torch.Tensor | None:
        """[V] bool: the tokens the grammar allows after `output`; None if `output` itself leaves the grammar."""
        common = 0
        for a, b in zip(self.consumed, output):
            if a != b:
                break
            common += 1
        if common < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - common)
            del self.consumed[common:]
        rest = output[common:]
        valid = self.matcher.validate_tokens(rest) if rest else 0
        if valid and self.matcher.consume_tokens(rest[:valid]):
            self.consumed.extend(rest[:valid])
        if valid < len(rest) and not (self.matcher.is_stopped() and set(rest[valid:]) <= self.eos_ids):
            return None
        return torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) > 0
