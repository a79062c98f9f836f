"""Token logprobs in OpenAI's two response shapes.

chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}
The values are the raw model's (before penalties, bias, grammar and temperature: vLLM's default logprobs mode),
computed by the last stage at each accepted position (shared/compute/sampling.py: token_logprob).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.codec import TextCodec
from shared.types.batch import TokenLogprob


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class LogprobsShaper:
    """One choice's logprobs; `text_offset` counts characters of the completion's text from 0 across chunks."""

    def __init__(self, codec: TextCodec, chat: bool):
        self.codec, self.chat, self.offset = codec, chat, 0

    def shape(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """The logprobs object for these tokens (a streamed chunk's or the whole reply's); None without any."""
        if not logprobs:
            return None
        texts = [self.codec.token_text(t) for t in tokens[: len(logprobs)]]
        tops = [[(self.codec.token_text(i), v) for i, v in zip(lp.top_ids, lp.top_logprobs)] for lp in logprobs]
        if self.chat:
            return {"content": [{**_entry(text, lp.logprob), "top_logprobs": [_entry(t, v) for t, v in top]}
                                for text, lp, top in zip(texts, logprobs, tops)]}
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": texts, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [dict(top) for top in tops], "text_offset": offsets}
