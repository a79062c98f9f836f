"""POST /v1/completions and POST /v1/chat/completions (OpenAI-compatible, streaming or not)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gateway.completions import check_request, full_body
from gateway.engine import Update, outcome_error
from gateway.errors import APIError
from gateway.prompts import generation_spec, prompt_ids
from gateway.records import RequestRecord
from gateway.responses import ResponseBuilder, sse
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from gateway.state import GatewayState, get_state
from gateway.streaming import DisconnectWatch, SSEResponse

router = APIRouter()
log = logging.getLogger("gateway")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, gw: GatewayState = Depends(get_state)):
    """Text completion of `prompt` (a string or token ids)."""
    check_request(body, gw)
    ids = await prompt_ids(body, gw.codec, chat=False)
    return await generate(request, gw, body, ids, chat=False, prompt_field="prompt")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, gw: GatewayState = Depends(get_state)):
    """Chat completion: `messages` rendered with the model's chat template."""
    check_request(body, gw)
    ids = await prompt_ids(body, gw.codec, chat=True)
    return await generate(request, gw, body, ids, chat=True, prompt_field="messages")


async def generate(request: Request, gw: GatewayState, body: SamplingRequest, ids: list[int], chat: bool,
                   prompt_field: str):
    spec = generation_spec(body, ids, gw.cfg, prompt_field)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    record = await gw.engine.submit(request_id, spec)
    build = ResponseBuilder(request_id, gw.cfg.model_name, chat)
    watch = DisconnectWatch(request)
    updates = gw.engine.updates(record, spec, watch)
    if body.stream:
        return await _stream_reply(gw, updates, record, build, watch, body.include_usage())
    reply = await full_body(gw, updates, record, build)
    return JSONResponse(reply, headers={"X-Request-Id": record.request_id})


async def _stream_reply(gw: GatewayState, updates: AsyncIterator[Update], record: RequestRecord,
                        build: ResponseBuilder, watch: DisconnectWatch, include_usage: bool) -> SSEResponse:
    """Wait for the first update so that a refused request still gets its HTTP status, then stream."""
    try:
        first = await anext(updates)
    except StopAsyncIteration:
        raise APIError(499, "client closed the request", code="client_closed_request") from None
    error = outcome_error(first, gw.cfg, record.request_id)
    if first.finished and error is not None and not record.tokens:
        await updates.aclose()
        raise error
    watch.response_started()
    events = _events(gw, first, updates, record, build, include_usage)
    return SSEResponse(events, headers={"X-Request-Id": record.request_id}, on_close=updates.aclose)


async def _events(gw: GatewayState, first: Update, updates: AsyncIterator[Update], record: RequestRecord,
                  build: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
    """The stream's events; an unexpected error still ends it with an OpenAI error chunk and [DONE]."""
    try:
        async with aclosing(_chunks(gw, first, updates, record, build, include_usage)) as chunks:
            async for event in chunks:
                yield event
    except Exception:
        log.exception("unexpected error while streaming %s", record.request_id)
        yield sse(build.error_chunk("internal error in the gateway; it has been logged", "server_error",
                                    "internal_error"))
        yield sse("[DONE]")


async def _chunks(gw: GatewayState, first: Update, updates: AsyncIterator[Update], record: RequestRecord,
                  build: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
    """One chunk per token group with new text (the first and the last always), then usage and [DONE]."""
    async with aclosing(updates) as it:
        update, started = first, False
        while True:
            error = outcome_error(update, gw.cfg, record.request_id)
            if error is not None:
                yield sse(build.error_chunk(error.message, error.type, error.code))
                break
            if update.delta or update.finished or not started:
                yield sse(build.chunk(update.delta, update.finish_reason, first=not started))
                started = True
            if update.finished:
                break
            update = await anext(it, None)
            if update is None:
                return
    if include_usage:
        yield sse(build.usage_chunk(record.prompt_tokens, len(record.tokens)))
    yield sse("[DONE]")

