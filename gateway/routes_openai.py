"""POST /v1/completions and POST /v1/chat/completions (OpenAI-compatible, streaming or not)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gateway.choices import Choice, indexed, merge, submit_all
from gateway.completions import check_request, collect
from gateway.engine import outcome_error
from gateway.errors import APIError, bad_request
from gateway.logprobs import LogprobsShaper
from gateway.prompts import check_grammar, echo_texts, generation_spec, prompt_list
from gateway.responses import ResponseBuilder, sse
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from gateway.state import GatewayState, get_state
from gateway.streaming import DisconnectWatch, SSEResponse

MAX_CHOICES = 64  # pipeline requests one HTTP request may start (prompts x n)
router = APIRouter()
log = logging.getLogger("gateway")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, gw: GatewayState = Depends(get_state)):
    """Text completion of `prompt` (a string or token ids, or a list of either: one choice set per prompt)."""
    check_request(body, gw)
    prompts = await prompt_list(body, gw.codec, chat=False)
    echoes = echo_texts(body, prompts, gw.codec) if body.echo_prompt() else [""] * len(prompts)
    return await generate(request, gw, body, prompts, echoes, chat=False, prompt_field="prompt")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, gw: GatewayState = Depends(get_state)):
    """Chat completion: `messages` rendered with the model's chat template."""
    check_request(body, gw)
    prompts = await prompt_list(body, gw.codec, chat=True)
    return await generate(request, gw, body, prompts, [""], chat=True, prompt_field="messages")


async def generate(request: Request, gw: GatewayState, body: SamplingRequest, prompts: list[list[int]],
                   echoes: list[str], chat: bool, prompt_field: str):
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices per request (prompts x n); this asks {len(prompts) * n}",
                          "prompt" if len(prompts) > 1 else "n")
    await check_grammar(body, gw.codec)  # once for every choice
    specs = [generation_spec(body, ids, gw.cfg, prompt_field, i, gw.codec.vocab_size) for ids in prompts
             for i in range(n)]
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    records = await submit_all(gw, request_id, specs)
    logprobs = body.top_logprobs_count() is not None
    choices = [Choice(k, record, spec, LogprobsShaper(gw.codec, chat) if logprobs else None, echoes[k // n])
               for k, (record, spec) in enumerate(zip(records, specs))]
    build = ResponseBuilder(request_id, gw.cfg.model_name, chat)
    watch = DisconnectWatch(request)
    prompt_tokens = sum(len(ids) for ids in prompts)
    if body.stream:
        return await _stream_reply(gw, choices, build, watch, body.include_usage(), prompt_tokens)
    tasks = [asyncio.ensure_future(collect(gw, gw.engine.updates(c.record, c.spec, watch), c.record))
             for c in choices]
    try:
        outcomes = await asyncio.gather(*tasks)
    except BaseException:  # one choice failed: the others' requests are cancelled, not left running
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    reply = build.reply([build.choice(c.index, c.echo + out.text, out.finish_reason,
                                      c.shaper.shape(out.tokens, out.logprobs) if c.shaper else None)
                         for c, out in zip(choices, outcomes)],
                        prompt_tokens, sum(len(c.record.tokens) for c in choices))
    return JSONResponse(reply, headers={"X-Request-Id": request_id})


async def _stream_reply(gw: GatewayState, choices: list[Choice], build: ResponseBuilder, watch: DisconnectWatch,
                        include_usage: bool, prompt_tokens: int) -> SSEResponse:
    """Wait for the first update so that a refused request still gets its HTTP status, then stream."""
    streams = [gw.engine.updates(c.record, c.spec, watch) for c in choices]
    updates = indexed(streams[0]) if len(streams) == 1 else merge(streams)
    try:
        first = await anext(updates)
    except StopAsyncIteration:
        raise APIError(499, "client closed the request", code="client_closed_request") from None
    record = choices[first[0]].record
    error = outcome_error(first[1], gw.cfg, record.request_id)
    if first[1].finished and error is not None and not record.tokens:
        await updates.aclose()
        raise error
    watch.response_started()
    events = _events(gw, first, updates, choices, build, include_usage, prompt_tokens)
    return SSEResponse(events, headers={"X-Request-Id": build.request_id}, on_close=updates.aclose)


async def _events(gw: GatewayState, first, updates: AsyncIterator, choices: list[Choice], build: ResponseBuilder,
                  include_usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
    """The stream's events; an unexpected error still ends it with an OpenAI error chunk and [DONE]."""
    try:
        async with aclosing(_chunks(gw, first, updates, choices, build, include_usage, prompt_tokens)) as chunks:
            async for event in chunks:
                yield event
    except Exception:
        log.exception("unexpected error while streaming %s", build.request_id)
        yield sse(build.error_chunk("internal error in the gateway; it has been logged", "server_error",
                                    "internal_error"))
        yield sse("[DONE]")


async def _chunks(gw: GatewayState, first, updates: AsyncIterator, choices: list[Choice], build: ResponseBuilder,
                  include_usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
    """Per choice, one chunk per token group with new text or logprobs (its first and last always; the first
    carries the echoed prompt), then usage and [DONE]."""
    started, finished = set(), set()
    async with aclosing(updates) as it:
        item = first
        while item is not None:
            k, update = item
            choice = choices[k]
            error = outcome_error(update, gw.cfg, choice.record.request_id)
            if error is not None:
                yield sse(build.error_chunk(error.message, error.type, error.code))
                break
            logprobs = choice.shaper.shape(update.tokens, update.logprobs) if choice.shaper else None
            if update.delta or update.finished or k not in started or logprobs:
                delta = update.delta if k in started else choice.echo + update.delta
                yield sse(build.chunk(delta, update.finish_reason, first=k not in started, index=k,
                                      logprobs=logprobs))
                started.add(k)
            if update.finished:
                finished.add(k)
                if len(finished) == len(choices):
                    break
            item = await anext(it, None)
        else:
            return
    if include_usage:
        yield sse(build.usage_chunk(prompt_tokens, sum(len(c.record.tokens) for c in choices)))
    yield sse("[DONE]")
