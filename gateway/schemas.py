"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their checks.

Types are strict (a string is not a number, a number is not a bool), as OpenAI's
API is. Unknown fields are ignored, as vLLM does; fields we know but do not
implement and that would change the result (n > 1, logprobs, tools, echo, ...)
are refused by `unsupported()` with a 400 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

Number = StrictFloat | StrictInt
T = TypeVar("T")
NonEmpty = Annotated[list[T], Field(min_length=1)]  # OpenAI's minItems 1 on the prompt's arrays
MAX_SEED = 2**63 - 1


class Speculation(BaseModel):
    """Extension: per-request speculation policy and tree width (RequestMsg.policy / width)."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal["specpipe", "tree", "pp"] | None = None
    width: Annotated[StrictInt, Field(ge=1, le=64)] | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # accepted (vLLM), not implemented: usage comes at the end


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None  # optional, as in vLLM: the served model
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None  # default 1.0 (OpenAI's)
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # extension; 0 or -1 = off
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=16)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    speculation: Speculation | None = None
    # known but not implemented: refused when set to anything that changes the result
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    echo: StrictBool | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not implement, else None."""
        checks = {
            "n": self.n not in (None, 1), "best_of": self.best_of not in (None, 1),
            "logprobs": self.logprobs not in (None, False), "top_logprobs": self.top_logprobs not in (None, 0),
            "logit_bias": bool(self.logit_bias), "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "response_format": (self.response_format or {}).get("type", "text") != "text",
            "tools": bool(self.tools), "functions": bool(self.functions), "echo": bool(self.echo),
            "suffix": bool(self.suffix),
        }
        return next((name for name, bad in checks.items() if bad), None)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: prompt is a string, token ids, or a one-element list of either."""

    prompt: (Annotated[StrictStr, Field(min_length=1)] | NonEmpty[StrictInt]
             | NonEmpty[Annotated[StrictStr, Field(min_length=1)]] | NonEmpty[NonEmpty[StrictInt]])

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        """One clear message for the empty forms the schema excludes ("", [], [""], [[]])."""
        if prompt in ("", []) or (isinstance(prompt, list) and any(p in ("", []) for p in prompt)):
            raise PydanticCustomError("prompt_empty", "prompt is empty")
        return prompt


class ContentPart(BaseModel):
    """Text only: the schema says so, as the server answers (another part type is a 400)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]  # the roles the chat templates take here
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
