"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their checks.

Types are strict (a string is not a number, a number is not a bool), as OpenAI's
API is. Unknown fields are ignored, as vLLM does; fields we know but do not
implement and that would change the result (tools, functions, suffix, best_of
other than n, ...) are refused by `unsupported()` with a 400 that names the field.
The README's API section lists every parameter and what this server does with it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

Number = StrictFloat | StrictInt
T = TypeVar("T")
NonEmpty = Annotated[list[T], Field(min_length=1)]  # OpenAI's minItems 1 on the prompt's arrays
MAX_SEED = 2**63 - 1
MAX_N = 16  # choices per prompt (each is a request of its own in the pipeline)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
Penalty = Annotated[Number, Field(ge=-2, le=2)]


class Speculation(BaseModel):
    """Extension: per-request speculation policy and tree width (RequestMsg.policy / width)."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal["specpipe", "tree", "pp"] | None = None
    width: Annotated[StrictInt, Field(ge=1, le=64)] | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # accepted (vLLM), not implemented: usage comes at the end


WHY = {
    "best_of": "'best_of' other than n is not supported: every sampled choice is returned, none is ranked away",
    "top_logprobs": "'top_logprobs' needs 'logprobs': true",
    "echo": "'echo' is supported for completions without logprobs only (prompt logprobs are not computed)",
    "tool_choice": "'tool_choice' other than 'none' is not supported: this server does not call tools",
    "parallel_tool_calls": "'parallel_tool_calls' other than true is not supported: this server does not call tools",
}


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
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None  # choice i is seeded with seed + i
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None  # extension (vLLM)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] | None = None  # extension (vLLM)
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=64)] | None = None  # vLLM
    ignore_eos: StrictBool | None = None  # extension (vLLM): the model's end-of-sequence does not end the output
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema (checked in gateway/prompts)
    # known but not implemented: refused when set to anything that changes the result
    best_of: StrictInt | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    suffix: StrictStr | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not implement, else None."""
        checks = {
            "best_of": self.best_of not in (None, self.n or 1), "tools": bool(self.tools),
            "functions": bool(self.functions), "tool_choice": self.tool_choice not in (None, "none"),
            "parallel_tool_calls": self.parallel_tool_calls not in (None, True), "suffix": bool(self.suffix),
            **self._unsupported(),
        }
        return next((name for name, bad in checks.items() if bad), None)

    def _unsupported(self) -> dict[str, bool]:
        return {}

    def why(self, field: str) -> str:
        """The 400's message for an unsupported field."""
        return WHY.get(field, f"'{field}' is not supported by this server")

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; k: the chosen token's logprob and the k most likely."""
        return None

    def echo_prompt(self) -> bool:
        return False

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: prompt is a string, token ids, or a list of either (a batch: choices per prompt)."""

    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # the k most likely per token
    echo: StrictBool | None = None  # the prompt's text before the completion's

    def _unsupported(self) -> dict[str, bool]:
        return {"echo": bool(self.echo) and self.logprobs is not None}  # would need the prompt's logprobs

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def echo_prompt(self) -> bool:
        return bool(self.echo)

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
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # needs logprobs: true
    echo: StrictBool | None = None  # vLLM's chat extension: refused

    def _unsupported(self) -> dict[str, bool]:
        return {"echo": bool(self.echo), "top_logprobs": self.top_logprobs is not None and not self.logprobs}

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
