"""The per-app objects the routes share (built once by create_app, reached through request.app.state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from gateway.codec import TextCodec
from gateway.config import GatewayConfig
from gateway.engine import Engine
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.queue import AsyncQueue
from gateway.records import RecordBook


@dataclass(frozen=True)
class GatewayState:
    cfg: GatewayConfig
    codec: TextCodec
    queue: AsyncQueue
    records: RecordBook
    metrics: Metrics
    engine: Engine
    admission: Admission = field(default_factory=lambda: Admission(0))  # the HTTP gateway's own


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway
