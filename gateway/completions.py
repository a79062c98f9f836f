"""The completion request path that POST /v1/(chat/)completions and the batch runner share.

`check_request` refuses what this server cannot answer (another model, an unsupported field);
`full_body` collects a request's updates into the non-streamed reply, or raises its HTTP error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from gateway.engine import Update, outcome_error
from gateway.errors import APIError, bad_request
from gateway.logprobs import LogprobsShaper
from gateway.records import RequestRecord
from gateway.responses import ResponseBuilder
from gateway.schemas import SamplingRequest
from gateway.state import GatewayState
from shared.types.batch import TokenLogprob


def check_request(body: SamplingRequest, gw: GatewayState) -> None:
    """404 for another model, 400 for a field we do not implement."""
    if body.model is not None and body.model != gw.cfg.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist (this server serves '{gw.cfg.model_name}')",
                       param="model", code="model_not_found")
    field = body.unsupported()
    if field is not None:
        raise bad_request(body.why(field), field, "unsupported_parameter")


@dataclass
class Outcome:
    """One choice's whole output once its request has ended well."""

    text: str
    finish_reason: str | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def collect(gw: GatewayState, updates: AsyncIterator[Update], record: RequestRecord) -> Outcome:
    """A request's updates, gathered; its APIError if it ended badly (499: nobody reads it)."""
    parts, last, tokens, logprobs = [], None, [], []
    async with aclosing(updates) as it:
        async for update in it:
            parts.append(update.delta)
            tokens.extend(update.tokens)
            logprobs.extend(update.logprobs)
            last = update
    if last is None:  # the client went away; nobody reads this
        raise APIError(499, "client closed the request", code="client_closed_request")
    error = outcome_error(last, gw.cfg, record.request_id)
    if error is not None:
        raise error
    return Outcome("".join(parts), last.finish_reason, tokens, logprobs)


async def full_body(gw: GatewayState, updates: AsyncIterator[Update], record: RequestRecord,
                    build: ResponseBuilder, shaper: LogprobsShaper | None = None, echo: str = "") -> dict:
    """The non-streamed reply of one choice once the request has ended (`echo`: the prompt's text before it)."""
    out = await collect(gw, updates, record)
    logprobs = shaper.shape(out.tokens, out.logprobs) if shaper is not None else None
    return build.full(echo + out.text, out.finish_reason, record.prompt_tokens, len(record.tokens), logprobs)
