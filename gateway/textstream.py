"""Incremental detokenization with stop strings.

TextAssembler turns the growing output token list into text deltas: it decodes
the whole output each time and sends only the new suffix, holding back text
that is not final yet (a trailing U+FFFD from a partial UTF-8 sequence, or a
tail that may be the start of a stop string). Concatenating every delta gives
exactly `text` at the end, streamed or not.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.codec import TextCodec


def _held_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextAssembler:
    """Accumulates output tokens; `add` returns the text that became final."""

    def __init__(self, codec: TextCodec, stops: Sequence[str] = ()):
        self.codec, self.stops = codec, tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.text = ""  # what has been handed out so far
        self.stopped = False  # a stop string was found: the output ends before it

    def add(self, tokens: Sequence[int], final: bool) -> str:
        """Append tokens; return the new text delta (final=True flushes everything held back)."""
        if self.stopped:
            return ""
        self.tokens.extend(tokens)
        full = self.codec.decode(self.tokens)
        cut = self._first_stop(full)
        if cut is not None:
            full, final, self.stopped = full[:cut], True, True
        if not final:
            full = full.rstrip("\ufffd")
            full = full[: len(full) - _held_stop_prefix(full, self.stops)]
        if len(full) <= len(self.text):
            return ""
        delta = full[len(self.text):]
        self.text += delta
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, len(self.text) - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None
