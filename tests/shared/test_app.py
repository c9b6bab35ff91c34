"""Error rendering, NaN bodies, readiness with a dead database."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, Field

from services.indicators.main import create_app
from shared.errors import install_error_handlers
from shared.local_services import free_port
from shared.settings import Settings
from tests.conftest import API_KEYS, asgi_client


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
