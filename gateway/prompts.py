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
from gateway.schemas import MAX_SEED, ChatCompletionRequest, CompletionRequest, SamplingRequest
from shared.types.errors import ConfigError, RequestError
from shared.types.structured import grammar_of
from shared.wire.messages import SamplingFields

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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None  # llguidance grammar of response_format
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def sampling(self) -> SamplingFields:
        return SamplingFields(self.temperature, self.top_p, self.top_k, self.seed, self.min_p, self.presence_penalty,
                              self.frequency_penalty, self.repetition_penalty, dict(self.logit_bias), self.grammar,
                              self.logprobs)


def completion_prompts(req: CompletionRequest, codec: TextCodec) -> list[list[int]]:
    """A string, token ids, or a list of either (a batch): each prompt's ids, checked."""
    prompt = req.prompt
    batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    return [_checked_ids(codec.encode(p) if isinstance(p, str) else list(p), codec) for p in batch]


def completion_prompt_ids(req: CompletionRequest, codec: TextCodec) -> list[int]:
    """One prompt (the batch API's lines): a batch of several is refused."""
    prompts = completion_prompts(req, codec)
    if len(prompts) != 1:
        raise bad_request("batched prompts are not supported here: send one prompt per request", "prompt")
    return prompts[0]


def echo_texts(req: CompletionRequest, prompts: list[list[int]], codec: TextCodec) -> list[str]:
    """Each prompt's text for `echo`: a string prompt as sent, token ids decoded."""
    sent = req.prompt if isinstance(req.prompt, list) and isinstance(req.prompt[0], (str, list)) else [req.prompt]
    return [p if isinstance(p, str) else codec.decode(ids) for p, ids in zip(sent, prompts)]


def _checked_ids(ids: list[int], codec: TextCodec) -> list[int]:
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


async def prompt_list(req: SamplingRequest, codec: TextCodec, chat: bool) -> list[list[int]]:
    """Every prompt of the request (several for a batched completion), in a worker thread."""
    if chat:
        return [await anyio.to_thread.run_sync(chat_prompt_ids, req, codec)]
    return await anyio.to_thread.run_sync(completion_prompts, req, codec)


def generation_spec(req: SamplingRequest, prompt_ids: list[int], cfg: GatewayConfig, prompt_field: str,
                    choice: int = 0, vocab_size: int | None = None) -> GenerationSpec:
    """Sampling settings with defaults filled in, after the context-length check. Choice i of n is seeded with
    seed + i (mod 2**63): each choice is reproducible alone, as the request with that seed and n = 1."""
    max_tokens = _max_tokens(req, len(prompt_ids), cfg, prompt_field)
    temperature = float(req.temperature if req.temperature is not None else 1.0)
    seed = req.seed if req.seed is not None else (0 if temperature == 0 else random.SystemRandom().randrange(2**31))
    spec = req.speculation
    return GenerationSpec(
        prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, temperature=temperature,
        top_p=float(req.top_p if req.top_p is not None else 1.0), top_k=max(req.top_k or 0, 0),
        seed=(seed + choice) % (MAX_SEED + 1), stops=req.stops(), policy=spec.policy if spec else None,
        width=spec.width if spec else None, min_p=float(req.min_p or 0.0),
        presence_penalty=float(req.presence_penalty or 0.0), frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=float(req.repetition_penalty if req.repetition_penalty is not None else 1.0),
        logit_bias=_logit_bias(req, vocab_size), grammar=_grammar(req), logprobs=req.top_logprobs_count(),
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos),
    )


def _logit_bias(req: SamplingRequest, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> sorted (id, bias) pairs; 400 for a key that is not a token id."""
    out = []
    for key, bias in (req.logit_bias or {}).items():
        if not key.isdigit() or (vocab_size is not None and int(key) >= vocab_size):
            raise bad_request(f"logit_bias key '{key}' is not a token id of this model's vocabulary", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def _grammar(req: SamplingRequest) -> str | None:
    try:
        return grammar_of(req.response_format)
    except ConfigError as exc:
        raise bad_request(str(exc), "response_format") from exc


async def check_grammar(req: SamplingRequest, codec: TextCodec) -> None:
    """response_format's grammar built once against the model's tokenizer, with its first token mask, as the
    last stage will build it (in a worker thread): what only the tokenizer shows (a token it lacks, a grammar
    it leaves no token for) is a 400 naming response_format, not a request failed in the pipeline."""
    grammar = _grammar(req)
    if grammar is None:
        return
    try:
        await anyio.to_thread.run_sync(codec.grammars.check, grammar)
    except RequestError as exc:
        raise bad_request(f"response_format: {exc}", "response_format") from exc


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
