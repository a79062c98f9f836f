"""The queue-monitoring dashboard: one static page (no CDN) that polls /dashboard/data.

    GET  /dashboard         the page (gateway/static/dashboard.html: plain JS, canvas charts)
    GET  /dashboard/data    JSON: the gateway's counters and recent latency percentiles, the
                            scheduler's stats snapshot, the stages' (KV use), the last columns of the
                            stage x step grid
    GET  /dashboard/login   a form for the API key when keys are configured;
    POST /dashboard/login   checks it (constant time) and sets an HttpOnly cookie that only
                            /dashboard/* accepts (a browser cannot send a Bearer header on navigation)
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Depends, Form
from fastapi.responses import HTMLResponse, RedirectResponse

from gateway.auth import COOKIE, key_matches
from gateway.records import QUEUED, RUNNING
from gateway.routes_ops import fresh_stage_stats, fresh_stats
from gateway.state import GatewayState, get_state

router = APIRouter(prefix="/dashboard", include_in_schema=False)
PAGE = (Path(__file__).parent / "static" / "dashboard.html").read_text(encoding="utf-8")
COLUMNS = 48  # steps shown in the stage x step grid
LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>SpecPipe dashboard</title></head>
<body style="font-family:system-ui;margin:3em"><h1>SpecPipe Serve dashboard</h1><p>{message}</p>
<form method="post" action="/dashboard/login"><label>API key <input type="password" name="key" autofocus></label>
<button type="submit">Open</button></form></body></html>"""


@router.get("", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)


@router.get("/data")
async def data(gw: GatewayState = Depends(get_state)) -> dict:
    stats = await fresh_stats(gw)
    try:
        columns = await gw.queue.occupancy(COLUMNS)
    except Exception:  # noqa: BLE001 - Redis down: the page shows what the gateway itself knows
        columns = []
    m = gw.metrics
    return {
        "time": time.time(), "model": gw.cfg.model_name, "stages": gw.cfg.stages, "exact": gw.cfg.exact_output,
        "gateway": {
            "queued": gw.records.count(QUEUED), "running": gw.records.count(RUNNING),
            "generation_tokens": int(m.total("vllm:generation_tokens_total")),
            "prompt_tokens": int(m.total("vllm:prompt_tokens_total")), "finished": m.ended(),
            "latency": {name: h.recent.percentiles() for name, h in
                        (("ttft", m.ttft), ("itl", m.itl), ("e2e", m.e2e), ("queue", m.queue))},
        },
        "scheduler": stats.to_json() if stats is not None else None,
        "stage_stats": [s.to_json() for s in sorted(await fresh_stage_stats(gw), key=lambda s: s.stage)],
        "occupancy": [{"step": c.step, "stages": c.stages} for c in columns],
    }


@router.get("/login", response_class=HTMLResponse)
async def login_form() -> HTMLResponse:
    return HTMLResponse(LOGIN.format(message="This gateway needs an API key."))


@router.post("/login", response_class=HTMLResponse)
async def login(key: str = Form(max_length=1000), gw: GatewayState = Depends(get_state)):
    if not gw.cfg.api_keys or key_matches(key, gw.cfg.api_keys):
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/dashboard")
        return response
    return HTMLResponse(LOGIN.format(message="That key is not valid."), status_code=401)
