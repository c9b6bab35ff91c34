"""Error rendering, NaN bodies, readiness with a dead database."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field

from services.indicators.main import create_app
from shared.errors import install_error_handlers
from shared.local_services import free_port
from shared.settings import Settings
from tests.support.clients import asgi_client
from tests.support.keys import API_KEYS


class Body(BaseModel):
    x: float = Field(allow_inf_nan=False)


async def test_nan_tokens_in_a_pydantic_body_get_422_not_500() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/x")
    async def x(body: Body) -> dict[str, float]:
        return {"x": body.x}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/x", content=b'{"x": NaN}', headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        assert r.json()["error"] == "validation_error"
        assert "x" in r.json()["detail"]
        r = await c.post("/x", content=b'{"x": Infinity}', headers={"Content-Type": "application/json"})
        assert r.status_code == 422


async def test_service_starts_without_database_and_reports_unhealthy() -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    app = create_app(Settings(database_url=dead, api_keys=API_KEYS))  # type: ignore[arg-type]
    async for client in asgi_client(app):
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/health/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unhealthy"
        assert body["services"]["database"]["status"] == "unhealthy"
        assert body["services"]["database"]["error"]
        # a request that needs the database gets a clear 503, not a 500
        r = await client.get("/v1/bars/SPX/D1")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "service_unavailable"


async def test_an_unexpected_error_is_a_json_500_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    from shared.app import RequestIdMiddleware

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/boom", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "detail": "internal error; request id req-500"}
    assert r.headers["x-request-id"] == "req-500"
    assert "RuntimeError: bug" in caplog.text


async def test_each_request_is_logged_once_with_status_and_duration(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(database_url="postgresql://postgres@127.0.0.1:1/none", api_keys=API_KEYS))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="aicash.access"):
        async for client in asgi_client(app):
            await client.get("/v1/indicators/catalog", headers={"X-Request-ID": "req-log"})
    (record,) = [r for r in caplog.records if r.name == "aicash.access"]
    assert record.getMessage() == "GET /v1/indicators/catalog 200"
    assert record.status == 200  # type: ignore[attr-defined]
    assert record.duration_ms >= 0  # type: ignore[attr-defined]


async def test_a_query_whose_session_the_server_ends_is_a_503_not_a_500(database_url: str) -> None:
    """A session the server ends under a running query (pg_terminate_backend here; `pg_ctl stop -m fast` in the
    process fault tests) is the database going away: 503 that names the error, not a 500."""
    app = FastAPI()
    install_error_handlers(app)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    started = asyncio.Event()
    pid: list[int] = []

    @app.get("/slow")
    async def slow() -> None:
        async with pool.acquire() as conn:
            pid.append(await conn.fetchval("SELECT pg_backend_pid()"))
            started.set()
            await conn.execute("SELECT pg_sleep(30)")

    async def end_the_session() -> None:
        await asyncio.wait_for(started.wait(), 10)
        killer = await asyncpg.connect(database_url)
        try:
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid[0])
        finally:
            await killer.close()

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=20) as c:
            r, _ = await asyncio.gather(c.get("/slow"), end_the_session())
    finally:
        pool.terminate()
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "service_unavailable"
    assert "a dependency is unavailable" in r.json()["detail"]


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.exceptions.CrashShutdownError("the database system is in recovery mode"),
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        asyncpg.exceptions.ConnectionFailureError("connection failure"),
        ConnectionResetError("reset by peer"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_every_way_the_database_goes_away_is_a_503(exc: Exception) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/db")
    async def db() -> None:
        raise exc

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/db")
    assert r.status_code == 503, r.text
    assert r.json() == {"error": "service_unavailable", "detail": f"a dependency is unavailable ({type(exc).__name__})"}
