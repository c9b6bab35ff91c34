"""Faults: indicators service down or silent, Redis that dies; predictions degrade, never hang or 500."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from services.predictor.main import create_app
from tests.support.clients import asgi_client
from tests.support.keys import READ_KEY
from tests.support.net import free_port
from tests.support.predictor import SYMBOL, predictor_settings

pytestmark = pytest.mark.faults

NO_CACHE = {"Cache-Control": "no-cache"}


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """Accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for w in held:
        w.close()
    server.close()


async def _client(settings_kwargs: dict[str, object]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(predictor_settings(**settings_kwargs))  # type: ignore[arg-type]
    async for c in asgi_client(app, READ_KEY):
        yield c


async def test_indicators_down_is_503_naming_it(database_url: str, store_url: str, models: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async for client in _client(
        {"database_url": database_url, "redis_url": None, "indicators_url": url, "store_url": store_url}
    ):
        r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})
        assert r.status_code == 503
        assert "indicators service" in r.json()["detail"] and "unreachable" in r.json()["detail"]
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["services"]["indicators"]["status"] == "unhealthy"


async def test_indicators_silent_is_503_within_the_timeout(
    database_url: str, store_url: str, models: dict[str, str], silent_server: str
) -> None:
    async for client in _client(
        {
            "database_url": database_url,
            "redis_url": None,
            "indicators_url": silent_server,
            "store_url": store_url,
            "indicators_timeout_seconds": 0.5,
        }
    ):
        r = await asyncio.wait_for(client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}), 10)
        assert r.status_code == 503
        assert "did not answer within 0.5 s" in r.json()["detail"]


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(100):
        try:
            redis.Redis.from_url(url, socket_timeout=0.2).ping()
            break
        except redis.RedisError:
            import time

            time.sleep(0.05)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def test_redis_that_stops_leaves_predictions_working(
    database_url: str,
    indicators_url: str,
    store_url: str,
    models: dict[str, str],
    own_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, proc = own_redis
    # Without the in-process L1, so every lookup goes to Redis (with it, entries already held keep serving).
    async for client in _client(
        {
            "database_url": database_url,
            "redis_url": url,
            "indicators_url": indicators_url,
            "store_url": store_url,
            "cache_l1_entries": 0,
        }
    ):
        body = {"symbol": SYMBOL, "timeframe": "H1"}
        first = await client.post("/v1/predictions", json=body)
        second = await client.post("/v1/predictions", json=body)
        assert (first.json()["cached"], second.json()["cached"]) == (False, True)
        assert (await client.get("/health/ready")).json()["status"] == "healthy"

        proc.terminate()
        proc.wait(10)
        for _ in range(5):
            r = await client.post("/v1/predictions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["cached"] is False
            assert r.json()["signal"] == first.json()["signal"]
        ready = await client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["services"]["cache"]["status"] == "degraded"
        metrics = (await client.get("/metrics")).text
        assert 'ml_prediction_cache_total{result="error"}' in metrics
