"""The per-request metrics recorded in RequestIdMiddleware's layer (shared.metrics.HttpMetrics): the series and
labels the instrumentator wrote, for matched, partially matched, unmatched, excluded and failing requests."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY

from shared.app import RequestIdMiddleware
from shared.errors import install_error_handlers
from shared.metrics import HttpMetrics


def _count(handler: str, method: str, status: str) -> float:
    labels = {"handler": handler, "method": method, "status": status}
    return REGISTRY.get_sample_value("http_requests_total", labels) or 0.0


def _observed(handler: str, method: str) -> float:
    labels = {"handler": handler, "method": method}
    return REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0.0


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware, metrics=HttpMetrics())

    @app.get("/t/items/{item}")
    async def item(item: str) -> dict[str, str]:
        return {"item": item}

    @app.get("/t/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def test_requests_are_counted_by_route_template_method_and_status() -> None:
    before = {
        "ok": _count("/t/items/{item}", "GET", "200"),
        "405": _count("/t/items/{item}", "POST", "405"),
        "404": _count("none", "GET", "404"),
        "500": _count("/t/boom", "GET", "500"),
        "latency": _observed("/t/items/{item}", "GET"),
        "health": _count("/health", "GET", "200"),
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://t") as c:
        for name in ("a", "b", "c"):  # three paths, one template
            assert (await c.get(f"/t/items/{name}")).status_code == 200
        assert (await c.post("/t/items/a")).status_code == 405
        for path in ("/t/nothing/1", "/t/nothing/2"):  # two unknown paths: one "none" series
            assert (await c.get(path)).status_code == 404
        assert (await c.get("/t/boom")).status_code == 500
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/t/health/x")).status_code == 404  # excluded like /health: never counted
    assert _count("/t/items/{item}", "GET", "200") - before["ok"] == 3
    assert _observed("/t/items/{item}", "GET") - before["latency"] == 3
    assert _count("/t/items/{item}", "POST", "405") - before["405"] == 1
    assert _count("none", "GET", "404") - before["404"] == 2
    assert _count("/t/boom", "GET", "500") - before["500"] == 1
    assert _count("/health", "GET", "200") == before["health"] == 0
    assert (
        REGISTRY.get_sample_value("http_requests_total", {"handler": "/t/nothing/1", "method": "GET", "status": "404"})
        is None
    )
