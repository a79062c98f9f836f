"""A request's choices: one pipeline request per (prompt, i < n), submitted together, answered as one reply.

Choice k = prompt k // n, sample k % n, seeded with seed + k % n (gateway/prompts.generation_spec); the reply's
choice index is k (vLLM's order). Streamed, the choices' chunks interleave as their tokens arrive (`merge`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from gateway.engine import Update
from gateway.logprobs import LogprobsShaper
from gateway.prompts import GenerationSpec
from gateway.records import RequestRecord
from gateway.state import GatewayState


@dataclass
class Choice:
    index: int
    record: RequestRecord
    spec: GenerationSpec
    shaper: LogprobsShaper | None  # None: no logprobs asked
    echo: str = ""  # the prompt's text, before the completion's (completions with echo)


async def submit_all(gw: GatewayState, request_id: str, specs: list[GenerationSpec]) -> list[RequestRecord]:
    """Submit every choice's request (ids: request_id, then request_id-1, -2, ...); if one cannot be submitted,
    those already are cancelled and its error raised."""
    records: list[RequestRecord] = []
    try:
        for k, spec in enumerate(specs):
            records.append(await gw.engine.submit(request_id if k == 0 else f"{request_id}-{k}", spec))
    except BaseException:
        for record in records:
            await gw.engine.queue.cancel(record.request_id)
        raise
    return records


async def indexed(updates: AsyncIterator[Update]) -> AsyncIterator[tuple[int, Update]]:
    """One choice's updates as (0, update)."""
    async with aclosing(updates) as it:
        async for update in it:
            yield 0, update


async def merge(streams: list[AsyncIterator[Update]]) -> AsyncIterator[tuple[int, Update]]:
    """(choice index, update) from every stream as they come; closing the merge cancels and closes them all (each
    engine.updates generator then cancels its request if it had not ended)."""
    pending = {asyncio.ensure_future(anext(s)): k for k, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                k = pending.pop(task)
                try:
                    update = task.result()
                except StopAsyncIteration:
                    continue
                yield k, update
                pending[asyncio.ensure_future(anext(streams[k]))] = k
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
