"""create_app(cfg) -> FastAPI: the gateway's wiring (no torch anywhere in the import graph)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.auth import APIKeyMiddleware
from gateway.batches.routes import install_batches
from gateway.codec import TextCodec
from gateway.config import GatewayConfig
from gateway.dashboard import router as dashboard_router
from gateway.engine import Engine
from gateway.errors import install_error_handlers
from gateway.exactness import AttentionHeaderMiddleware
from gateway.latency import TimingMiddleware, instrument
from gateway.limits import Admission, AdmissionMiddleware, BodyLimitMiddleware
from gateway.metrics import Metrics
from gateway.openapi import install_openapi
from gateway.queue import AsyncQueue
from gateway.records import QUEUED, RUNNING, RecordBook
from gateway.routes_openai import router as openai_router
from gateway.routes_ops import router as ops_router
from gateway.state import GatewayState
from shared.model_store import resolve_model


def build_state(cfg: GatewayConfig) -> GatewayState:
    """Load the tokenizer and chat template (the model must already be in the cache) and the shared objects."""
    model_dir = resolve_model(cfg.model, fetch=False)
    cfg = cfg.resolved(model_dir)
    codec = TextCodec(model_dir)
    queue = AsyncQueue(cfg.redis, cfg.stages, cfg.redis_pool_size)
    records, admission = RecordBook(cfg.record_limit), Admission(cfg.max_inflight)
    metrics = Metrics(cfg.model_name, cfg.max_prompt_tokens, lambda: records.count(RUNNING),
                      lambda: records.count(QUEUED), lambda: admission.inflight)
    engine = Engine(cfg, codec, queue, records, metrics)
    return GatewayState(cfg, codec, queue, records, metrics, engine, admission)


def create_app(cfg: GatewayConfig) -> FastAPI:
    """The FastAPI app: OpenAI routes, operational routes, error handlers, API keys, limits.

    Middleware, outermost first: timing, attention header, body limit (413), API keys (401),
    admission (429), then the routes."""
    state = instrument(build_state(cfg))  # + the added-latency histogram

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await state.queue.close()

    app = FastAPI(title="SpecPipe Serve gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(ops_router)
    app.include_router(dashboard_router)
    install_batches(app, state.cfg, state.queue.r)  # /v1/files, /v1/batches
    install_openapi(app)
    app.add_middleware(AdmissionMiddleware, admission=state.admission, retry_after_s=state.cfg.retry_after_s)
    if state.cfg.api_keys:
        app.add_middleware(APIKeyMiddleware, keys=state.cfg.api_keys)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.cfg.max_body_bytes,
                       file_max_bytes=state.cfg.max_file_bytes)
    app.add_middleware(AttentionHeaderMiddleware, kind=state.cfg.attention)
    app.add_middleware(TimingMiddleware, added=state.metrics.added)  # outermost: arrival time
    return app
