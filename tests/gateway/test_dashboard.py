"""The queue-monitoring dashboard: its data endpoint, its keys, and the page in a real headless browser."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from tests.gateway.conftest import MODEL_NAME

pytestmark = pytest.mark.multiproc
CHROMIUM = "/usr/bin/chromium"  # Debian's package (`make test` installs it); playwright downloads nothing


def _load(url: str, n: int, max_tokens: int, stop: threading.Event) -> threading.Thread:
    """n concurrent completions, again and again until `stop` is set: requests stay in flight."""
    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5 + i, 6, 7, 5, 6, 7],
                                                "max_tokens": max_tokens, "temperature": 0.7, "seed": i})
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_data_endpoint_shows_the_pipeline_and_the_scheduler(client) -> None:
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5, 6, 7, 5, 6], "max_tokens": 30,
                                             "temperature": 0})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    def fresh(d: dict) -> bool:  # the scheduler rewrites its snapshot every 0.5 s
        return d["scheduler"] is not None and d["scheduler"]["tokens"] >= 30 and bool(d["occupancy"])

    while not fresh(d := client.get("/dashboard/data").json()):
        assert time.monotonic() < deadline, d
        time.sleep(0.2)
    assert d["model"] == MODEL_NAME and d["stages"] == 2 and d["exact"] is True
    assert d["gateway"]["generation_tokens"] >= 30 and d["gateway"]["latency"]["ttft"]["p50"] > 0
    s = d["scheduler"]
    assert s["steps"] > 0 and s["tokens"] >= 30 and len(s["stage_busy"]) == 2
    kv = d["stage_stats"]  # the stages' snapshots, rewritten idle or not
    assert [st["stage"] for st in kv] == [0, 1] and all(st["kv_slots"] > 0 and 0 <= st["kv_usage"] <= 1 for st in kv)
    steps = [c["step"] for c in d["occupancy"]]
    assert steps == sorted(steps) and all(len(c["stages"]) == 2 for c in d["occupancy"])
    cells = [cell for c in d["occupancy"] for stage in c["stages"] for cell in stage]
    assert cells and all(isinstance(rid, str) and useful >= 0 and wasted >= 0 for rid, useful, wasted in cells)
    page = client.get("/dashboard")
    assert page.status_code == 200 and "<canvas id=\"grid\"" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN


def test_dashboard_sits_behind_the_api_keys(keyed_gateway) -> None:
    with httpx.Client(base_url=keyed_gateway.url, timeout=30, follow_redirects=False) as c:
        assert c.get("/dashboard").status_code == 303  # a browser is sent to the login form
        assert c.get("/dashboard/data").status_code == 401
        assert c.get("/dashboard/data", headers={"Authorization": "Bearer key-two"}).status_code == 200
        assert c.post("/dashboard/login", data={"key": "wrong"}).status_code == 401
        login = c.post("/dashboard/login", data={"key": "key-one"})
        assert login.status_code == 303 and "httponly" in login.headers["set-cookie"].lower()
        assert c.get("/dashboard/data").status_code == 200  # the cookie now
        assert c.get("/metrics").status_code == 401  # the cookie opens only the dashboard


def test_page_updates_live_in_a_headless_browser(gateway, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: `make test` installs Debian's chromium package"
    stop = threading.Event()
    threads = _load(gateway.url, 4, 200, stop)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(gateway.url + "/dashboard?interval=300")
            page.wait_for_function("document.getElementById('running-count').textContent !== '–'", timeout=20_000)
            seen = {page.inner_text("#tokens-total")}
            deadline = time.monotonic() + 30
            while len(seen) < 3 and time.monotonic() < deadline:  # the numbers move while requests run
                page.wait_for_timeout(400)
                seen.add(page.inner_text("#tokens-total"))
            assert len(seen) >= 3, seen
            page.wait_for_function("Number(document.getElementById('grid').dataset.busyCells) > 0", timeout=20_000)
            assert page.inner_text("#status") == "scheduler live"
            page.wait_for_function("parseFloat(document.getElementById('kv').textContent) > 0", timeout=20_000)
            assert float(page.inner_text("#tps-step")) > 0
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            browser.close()
        assert not errors, errors
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def test_approximate_attention_is_announced_everywhere(gw_tmp, tiny_dir, cluster, gateway) -> None:
    from tests.gateway.conftest import Gateway

    approx = Gateway(gw_tmp, tiny_dir, cluster.cfg.prefix, "--attention", "distr", name="distr")
    try:
        with httpx.Client(base_url=approx.url, timeout=30) as c:
            models = c.get("/v1/models")
            assert models.headers["x-specpipe-attention"] == "distr; approximate"
            assert models.json()["data"][0]["exact_output"] is False
            assert c.get("/dashboard/data").json()["exact"] is False  # the page shows its banner
            assert "approximate attention" in c.get("/dashboard").text.lower()
    finally:
        approx.close()
    exact = httpx.get(gateway.url + "/v1/models", timeout=30)
    assert exact.headers["x-specpipe-attention"] == "exact" and exact.json()["data"][0]["exact_output"] is True
