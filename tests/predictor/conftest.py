"""Predictor fixtures: a real indicators service (uvicorn subprocess), a model store, models registered
as the trainer would, bars ingested over HTTP, and the predictor app in-process."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from services.predictor.main import create_app
from services.predictor.settings import PredictorSettings
from shared.bars import bars_to_rows
from shared.storage import ObjectStore, store_from_url
from tests.data import generate_bars
from tests.predictor.model_factory import feature_scaler, register, write_model
from tests.support.clients import asgi_client
from tests.support.keys import API_KEYS, READ_KEY, WRITE_KEY
from tests.support.net import free_port, start_uvicorn, stop
from tests.support.predictor import (
    N_BARS,
    SHORT,
    SYMBOL,
    SYMBOL2,
    TRAINER_KEY,
    predictor_settings,
)


@pytest.fixture(scope="session")
def indicators_url(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("indicators") / "indicators.log"
    proc = start_uvicorn(
        "services.indicators.main:app", port, {"DATABASE_URL": database_url, "API_KEYS": API_KEYS}, log
    )
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="session")
def trainer_url(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real trainer API (uvicorn) that the predictor asks for explanations; its Celery messages go to a
    queue of this run's own that nobody consumes (the rows it writes are what these tests read)."""
    import redis

    port = free_port()
    queue = f"predictor-explain-{os.getpid()}-{secrets.token_hex(3)}"
    log = tmp_path_factory.mktemp("trainer") / "trainer.log"
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "TRAINER_QUEUE": queue,
        "API_KEYS": f"predictor:write:{TRAINER_KEY}",
        "ENVIRONMENT": "test",
    }
    proc = start_uvicorn("services.trainer.main:app", port, env, log)
    yield f"http://127.0.0.1:{port}"
    stop(proc)
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    client.delete(queue)
    client.close()


@pytest.fixture(scope="session")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"file://{tmp_path_factory.mktemp('models')}"


@pytest.fixture(scope="session")
def store(store_url: str) -> ObjectStore:
    return store_from_url(store_url)


@pytest.fixture(scope="session")
def hourly_bars() -> object:
    return generate_bars("H1", N_BARS, seed=7)


@pytest.fixture(scope="session")
def ingested(indicators_url: str, hourly_bars: object) -> dict[str, int]:
    """PRED1 and PRED2 with 3,000 H1 bars, PRED3 with 510 (fewer than 500 warm-up + 20)."""
    from shared.timeframes import OHLCV

    assert isinstance(hourly_bars, OHLCV)
    counts = {SYMBOL: N_BARS, SYMBOL2: N_BARS, SHORT: 510}
    with httpx.Client(base_url=indicators_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as client:
        for symbol, n in counts.items():
            r = client.post(f"/v1/bars/{symbol}/H1", json={"bars": bars_to_rows(hourly_bars.tail(n))})
            assert r.status_code == 200, r.text
    return counts


@pytest.fixture(scope="session")
def scaler(hourly_bars: object) -> tuple[list[float], list[float]]:
    from shared.features import feature_rows
    from shared.timeframes import OHLCV

    assert isinstance(hourly_bars, OHLCV)
    return feature_scaler(feature_rows(hourly_bars).values)


@pytest.fixture(scope="session")
async def models(
    database_url: str, store: ObjectStore, ingested: dict[str, int], scaler: tuple[list[float], list[float]]
) -> dict[str, str]:
    """Production models: PRED1 H1 v1, PRED1 H4 v1, PRED3 H1 v1. Returns the versions by key."""
    mean, scale = scaler
    out: dict[str, str] = {}
    for symbol, tf, seed in ((SYMBOL, "H1", 1), (SYMBOL, "H4", 2), (SHORT, "H1", 3)):
        sha = write_model(store, symbol, tf, "v1", seed=seed, mean=mean, scale=scale, temperature=1.5)
        await register(database_url, store, symbol, tf, "v1", sha)
        out[f"{symbol}/{tf}"] = "v1"
    return out


@pytest.fixture(scope="session")
def settings(
    database_url: str, redis_url: str, indicators_url: str, store_url: str, trainer_url: str, models: dict[str, str]
) -> PredictorSettings:
    # No bar-close signals from this session-long app: it would compute every bar the streaming tests' replicas
    # compute (under their own stream prefix) and log a second stream row for it. Apps that test the stream
    # (test_streaming's replicas, test_webhooks' app) turn it on.
    return predictor_settings(
        database_url,
        redis_url,
        indicators_url,
        store_url,
        trainer_url=trainer_url,
        trainer_api_key=TRAINER_KEY,
        stream_enabled=False,
    )


@pytest.fixture(scope="session")
def app(settings: PredictorSettings) -> FastAPI:
    return create_app(settings)


@pytest.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for c in asgi_client(app, READ_KEY):
        yield c
