"""Operational endpoints: /health, /ready, /metrics, /v1/models, /v1/requests/{id} (+ /cancel)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response

from gateway.errors import APIError, error_response
from gateway.queue import QueueError
from gateway.records import FINISHED, QUEUED, RUNNING, public_status
from gateway.state import GatewayState, get_state

router = APIRouter()
RequestId = Path(max_length=200)
STATS_MAX_AGE_S = 30.0  # an older scheduler or stage snapshot is left out (the process is gone)


@router.get("/health")
async def health() -> dict:
    """200 while the process is alive (no dependency checked)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(gw: GatewayState = Depends(get_state)) -> JSONResponse:
    """200 when Redis answers and the scheduler and every stage have a live heartbeat, else 503."""
    try:
        missing = await gw.queue.missing_components()
    except QueueError:
        return error_response(503, "Redis is not reachable", "server_error", None, "not_ready")
    if missing:
        return error_response(503, f"not ready: no heartbeat from {', '.join(missing)}", "server_error", None,
                              "not_ready")
    return JSONResponse({"status": "ready", "stages": gw.cfg.stages})


@router.get("/metrics")
async def metrics(request: Request, gw: GatewayState = Depends(get_state)) -> Response:
    """Prometheus text format (OpenMetrics when the Accept header asks for it), vLLM's metric names."""
    body, content_type = gw.metrics.exposition(await fresh_stats(gw), request.headers.get("accept", ""),
                                               await fresh_stage_stats(gw))
    return Response(body, headers={"Content-Type": content_type})


def _model_card(gw: GatewayState) -> dict:
    return {"id": gw.cfg.model_name, "object": "model", "created": 0, "owned_by": "specpipe",
            "root": gw.cfg.model, "max_model_len": gw.cfg.max_prompt_tokens,
            "attention": gw.cfg.attention, "exact_output": gw.cfg.exact_output}


@router.get("/v1/models")
async def list_models(gw: GatewayState = Depends(get_state)) -> dict:
    return {"object": "list", "data": [_model_card(gw)]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, gw: GatewayState = Depends(get_state)) -> dict:
    if model != gw.cfg.model_name:
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    return _model_card(gw)


@router.get("/v1/requests/{request_id}")
async def request_status(request_id: str = RequestId, gw: GatewayState = Depends(get_state)) -> dict:
    """queued / running / finished, tokens and text so far: the gateway's record, else the out stream."""
    record = gw.records.get(request_id)
    if record is not None:
        return record.to_json()
    history = await _history(gw, request_id)
    tokens = [t for msg in history for t in msg.tokens]
    last = history[-1] if history else None
    finished = bool(last and last.finished)
    status, finish_reason = public_status(FINISHED if finished else RUNNING if tokens else QUEUED,
                                          last.finish_reason if finished else None)
    return {
        "id": request_id, "object": "request.status", "model": gw.cfg.model_name, "created": None,
        "status": status, "finish_reason": finish_reason, "error": last.error if finished else None,
        "prompt_tokens": None, "completion_tokens": len(tokens), "tokens": tokens, "text": gw.codec.decode(tokens),
    }


@router.post("/v1/requests/{request_id}/cancel")
async def cancel_request(request_id: str = RequestId, gw: GatewayState = Depends(get_state)) -> dict:
    """Publish a CancelMsg for a request that has not finished; 404 for an unknown id."""
    record = gw.records.get(request_id)
    if record is not None:
        finished = record.status == FINISHED
    else:
        history = await _history(gw, request_id)
        finished = bool(history and history[-1].finished)
    if not finished:
        try:
            await gw.queue.cancel(request_id)
        except QueueError as exc:
            raise APIError(503, "the request queue is not reachable", code="queue_unavailable") from exc
    return {"id": request_id, "object": "request.cancel", "cancelled": not finished,
            "status": FINISHED if finished else "cancelling"}


async def _history(gw: GatewayState, request_id: str):
    try:
        history = await gw.queue.history(request_id)
    except QueueError as exc:
        raise APIError(503, "the request queue is not reachable", code="queue_unavailable") from exc
    if history is None:
        raise APIError(404, f"no request with id '{request_id}'", param="request_id", code="request_not_found")
    return history


async def fresh_stats(gw: GatewayState):
    """The scheduler's snapshot if Redis answers and it is recent; metrics then include its series."""
    try:
        return await gw.queue.scheduler_stats(STATS_MAX_AGE_S)
    except QueueError:
        return None


async def fresh_stage_stats(gw: GatewayState):
    """The stages' recent snapshots ([] if Redis does not answer); metrics include the KV use of these."""
    try:
        return await gw.queue.stage_stats(STATS_MAX_AGE_S)
    except QueueError:
        return []
