"""OpenAI response objects and Server-Sent Events chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One SSE event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class ResponseBuilder:
    """Builds one request's reply objects; `chat` picks chat.completion(.chunk) over text_completion."""

    request_id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        """One choice of the non-streamed reply."""
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def reply(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        """The non-streamed reply with its choices."""
        body = self._head("chat.completion" if self.chat else "text_completion")
        return {**body, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def full(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int,
             logprobs: dict | None = None) -> dict:
        """The non-streamed reply of one choice."""
        return self.reply([self.choice(0, text, finish_reason, logprobs)], prompt_tokens, completion_tokens)

    def chunk(self, delta: str, finish_reason: str | None = None, first: bool = False, index: int = 0,
              logprobs: dict | None = None) -> dict:
        """A streamed chunk with a text delta (the first chat chunk also carries the role)."""
        if self.chat:
            d: dict[str, Any] = {"content": delta} if delta or first else {}
            if first:
                d = {"role": "assistant", **d}
            choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk with stream_options.include_usage: usage and no choices."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def error_chunk(self, message: str, type: str, code: str | None) -> dict:
        """An error after the stream has started (the HTTP status is already 200)."""
        return {"error": {"message": message, "type": type, "param": None, "code": code}}
