"""The grammar's token mask at any tree node (last stage): one llguidance matcher per request, rolled back
to the common prefix of what it consumed and the node's output, then advanced along the node's path.

A node whose drafted path leaves the grammar gets no mask (None): its token is not what the masked target chose
at its parent, so verification prunes it before its own target is ever read.
"""

from __future__ import annotations

import llguidance
import torch

from shared.types import structured
from shared.types.errors import RequestError


class Grammars(structured.Grammars):
    """The last stage's: each request's matcher wrapped for masking at tree nodes."""

    def node_grammar(self, grammar: str) -> NodeGrammar:
        """RequestError if the grammar cannot be used with this tokenizer."""
        return NodeGrammar(self.matcher(grammar), frozenset(self.eos_ids))


class NodeGrammar:
    """One request's matcher and the output tokens it has consumed. Once the grammar is complete and an
    end-of-sequence token consumed (ignore_eos keeps going), it allows only end-of-sequence tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: frozenset[int]):
        self.matcher, self.eos_ids, self.consumed = matcher, eos_ids, []

    def allowed(self, output: list[int]) -> torch.Tensor | None:
        """[V] bool: the tokens the grammar allows after `output`; None if `output` itself leaves the grammar.
        RequestError if the matcher fails (llguidance's limits, an internal error): the request fails alone."""
        try:
            return self._allowed(output)
        except (ValueError, RuntimeError) as exc:  # what llguidance's Python binding raises
            raise RequestError(f"grammar failed: {exc}") from exc

    def _allowed(self, output: list[int]) -> torch.Tensor | None:
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
        mask = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        if self.matcher.is_error():
            raise RequestError(f"grammar failed: {self.matcher.get_error()}")
        return mask
