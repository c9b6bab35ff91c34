"""Trainer fixtures: a real S3-compatible server (seaweedfs), real bars in the test database, a real
Celery worker process on a Redis queue of this run's own."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from services.trainer.jobs import run_job
from services.trainer.settings import TrainerSettings
from shared.storage import ObjectStore, store_from_url
from shared.timeframes import OHLCV, Timeframe
from tests.support import REPO
from tests.support.celery import Worker
from tests.support.keys import API_KEYS
from tests.support.s3 import seaweed_s3
from tests.support.trainer import (
    BUCKET,
    SYMBOL,
    TINY,
    TcpProxy,
    ingest,
    new_job,
    via_proxy,
)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real seaweedfs server with its S3 gateway and the models' bucket, killed at the end of the run."""
    with seaweed_s3(tmp_path_factory.mktemp("weed"), BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def settings(database_url: str, redis_url: str) -> TrainerSettings:
    """Trainer settings on the test database and Redis, without an object store: for the registry and lifecycle
    tests, whose versions have made-up artifacts. A module that needs more defines its own `settings`."""
    return TrainerSettings(database_url=database_url, redis_url=redis_url, api_keys=API_KEYS, environment="test")


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database of its own, closed after the test."""
    c = await asyncpg.connect(database_url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(scope="session")
def store_url() -> str:
    return f"s3://{BUCKET}/run-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def s3_store(s3_endpoint: str, store_url: str) -> ObjectStore:
    return store_from_url(store_url, s3_endpoint)


@pytest.fixture(scope="session")
def trainer_settings(database_url: str, s3_endpoint: str, store_url: str, redis_url: str) -> TrainerSettings:
    return TrainerSettings(  # type: ignore[arg-type]
        database_url=database_url,
        redis_url=redis_url,
        model_store_url=store_url,
        s3_endpoint_url=s3_endpoint,
        api_keys=API_KEYS,
        environment="test",
    )


@pytest.fixture(scope="session")
async def spx_bars(database_url: str, sp500: OHLCV) -> str:
    """Real S&P 500 daily bars (5031) stored as SPXTRAIN D1."""
    await ingest(database_url, SYMBOL, Timeframe.D1, sp500)
    return SYMBOL


@pytest.fixture(scope="session")
def pg_proxy(database_url: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(database_url)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def worker_env(
    trainer_settings: TrainerSettings, tmp_path_factory: pytest.TempPathFactory, pg_proxy: TcpProxy
) -> dict[str, str]:
    assert trainer_settings.database_url and trainer_settings.redis_url and trainer_settings.s3_endpoint_url
    return {
        **os.environ,
        # The worker reaches PostgreSQL through a proxy the tests can cut (the API and the tests do not).
        "DATABASE_URL": via_proxy(trainer_settings.database_url, pg_proxy),
        "CELERY_BROKER_URL": trainer_settings.redis_url,
        "MODEL_STORE_URL": trainer_settings.model_store_url,
        "S3_ENDPOINT_URL": trainer_settings.s3_endpoint_url,
        "TRAINER_QUEUE": f"trainer-test-{os.getpid()}-{secrets.token_hex(3)}",
        "TRAINER_FAULT_INJECTION": "true",
        # The jobs these tests count are training jobs: no validation follows (tests/trainer/test_quality_jobs.py).
        "TRAINER_VALIDATE_AFTER_TRAIN": "false",
        "TRAINER_RETRY_DELAY_SECONDS": "1",
        # PostgreSQL unreachable: retry the delivery every second or so, for as long as a test keeps it down.
        "TRAINER_DB_RETRY_BASE_SECONDS": "0.5",
        "TRAINER_DB_RETRY_MAX_DELAY_SECONDS": "1",
        "TRAINER_DB_RETRY_MAX": "100",
        # Redelivery of a dead worker's message within seconds (production: hours, above the longest job).
        "TRAINER_VISIBILITY_TIMEOUT_SECONDS": "15",
        "TRAINER_UNACKED_RESTORE_INTERVAL_SECONDS": "2",
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(
        env=worker_env,
        log_path=tmp_path_factory.mktemp("worker") / "worker.log",
        app="services.trainer.celery_app",
        queue=worker_env["TRAINER_QUEUE"],
        name="trainer-test",
    )
    w.start()
    yield w
    w.stop_all()


@pytest.fixture(scope="session")
async def trained(spx_bars: str, trainer_settings: TrainerSettings) -> dict[str, Any]:
    assert trainer_settings.database_url
    job_id = await new_job(trainer_settings.database_url, spx_bars, "D1", TINY)
    result = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)
    return {"job_id": job_id, "result": result}
