"""Request bodies -> prompt token ids and the generation spec sent to the scheduler.

Every way a prompt or a sampling setting can be unusable ends in a 400 APIError
naming the field; the context check (prompt + max_tokens within the model's
context) ends in 400 with code "context_length_exceeded". `prompt_ids` tokenizes (and
renders the chat template) in a worker thread, so a long prompt never stalls the event loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import anyio

from gateway.codec import TemplateError, TextCodec
from gateway.config import GatewayConfig
from gateway.errors import APIError, bad_request
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class GenerationSpec:
    """What one request asks of the pipeline (RequestMsg's fields, plus the gateway's stop strings)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stops: tuple[str, ...] = ()
    policy: str | None = None
    width: int | None = None


def completion_prompt_ids(req: CompletionRequest, codec: TextCodec) -> list[int]:
    """A string, a token-id list, or a one-element list of either; batches are refused."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("batched prompts are not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    ids = codec.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise bad_request("prompt is empty", "prompt")
    bad = next((t for t in ids if not 0 <= t < codec.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{codec.vocab_size - 1})", "prompt")
    return ids


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template expects them: role and text content ("developer" is "system")."""
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in CHAT_ROLES:
            raise bad_request(f"unsupported role '{m.role}' (use system, user or assistant)", f"messages.{i}.role")
        out.append({"role": role, "content": _text_content(m.content, i)})
    return out


def _text_content(content: object, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:  # list[ContentPart]
        if part.type != "text" or part.text is None:
            raise bad_request(f"content part of type '{part.type}' is not supported (text only)",
                              f"messages.{i}.content")
        parts.append(part.text)
    return "\n".join(parts)


def chat_prompt_ids(req: ChatCompletionRequest, codec: TextCodec) -> list[int]:
    try:
        return codec.encode_chat(chat_messages(req))
    except TemplateError as exc:
        raise bad_request(f"the chat template refused these messages: {exc}", "messages") from exc


async def prompt_ids(req: SamplingRequest, codec: TextCodec, chat: bool) -> list[int]:
    """chat_prompt_ids or completion_prompt_ids, run in a worker thread (its 400s raised here)."""
    if chat:
        return await anyio.to_thread.run_sync(chat_prompt_ids, req, codec)
    return await anyio.to_thread.run_sync(completion_prompt_ids, req, codec)


def generation_spec(req: SamplingRequest, prompt_ids: list[int], cfg: GatewayConfig,
                    prompt_field: str) -> GenerationSpec:
    """Sampling settings with defaults filled in, after the context-length check."""
    max_tokens = _max_tokens(req, len(prompt_ids), cfg, prompt_field)
    temperature = float(req.temperature if req.temperature is not None else 1.0)
    seed = req.seed if req.seed is not None else (0 if temperature == 0 else random.SystemRandom().randrange(2**31))
    spec = req.speculation
    return GenerationSpec(
        prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, temperature=temperature,
        top_p=float(req.top_p if req.top_p is not None else 1.0), top_k=max(req.top_k or 0, 0), seed=seed,
        stops=req.stops(), policy=spec.policy if spec else None, width=spec.width if spec else None,
    )


def _max_tokens(req: SamplingRequest, prompt_len: int, cfg: GatewayConfig, prompt_field: str) -> int:
    context = cfg.max_prompt_tokens
    requested = req.requested_max_tokens()
    wanted = requested if requested is not None else min(cfg.default_max_tokens, context - prompt_len)
    if requested is None and wanted >= 1:
        return wanted
    if prompt_len + max(wanted, 1) > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max(wanted, 1)} tokens ({prompt_len} in the {prompt_field}, {max(wanted, 1)} in the "
            f"completion). Please reduce the length of the {prompt_field} or completion.",
            param=prompt_field if requested is None else "max_tokens", code="context_length_exceeded",
        )
    return wanted
