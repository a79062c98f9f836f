"""The completion request path that POST /v1/(chat/)completions and the batch runner share.

`check_request` refuses what this server cannot answer (another model, an unsupported field);
`full_body` collects a request's updates into the non-streamed reply, or raises its HTTP error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from gateway.engine import Update, outcome_error
from gateway.errors import APIError, bad_request
from gateway.records import RequestRecord
from gateway.responses import ResponseBuilder
from gateway.schemas import SamplingRequest
from gateway.state import GatewayState


def check_request(body: SamplingRequest, gw: GatewayState) -> None:
    """404 for another model, 400 for a field we do not implement."""
    if body.model is not None and body.model != gw.cfg.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist (this server serves '{gw.cfg.model_name}')",
                       param="model", code="model_not_found")
    field = body.unsupported()
    if field is not None:
        raise bad_request(f"'{field}' is not supported by this server", field, "unsupported_parameter")


async def full_body(gw: GatewayState, updates: AsyncIterator[Update], record: RequestRecord,
                    build: ResponseBuilder) -> dict:
    """The non-streamed reply once the request has ended; its APIError if it ended badly (499: nobody reads it)."""
    parts, last = [], None
    async with aclosing(updates) as it:
        async for update in it:
            parts.append(update.delta)
            last = update
    if last is None:  # the client went away; nobody reads this
        raise APIError(499, "client closed the request", code="client_closed_request")
    error = outcome_error(last, gw.cfg, record.request_id)
    if error is not None:
        raise error
    return build.full("".join(parts), last.finish_reason, record.prompt_tokens, len(record.tokens))
