"""Suite-wide fixtures: a database of its own for this run (dropped at the end), Redis, real sample data.

DATABASE_URL / REDIS_URL point at running servers (CI and this machine: 127.0.0.1:5432 and :6379); when
unset, embedded servers are started under var/.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from shared.bars import bars_to_rows
from shared.local_services import scratch_database
from shared.timeframes import OHLCV

ADMIN_KEY = "test-admin-secret-0001"
WRITE_KEY = "test-write-secret-0001"
READ_KEY = "test-read-secret-00001"
API_KEYS = f"admin:admin:{ADMIN_KEY},writer:write:{WRITE_KEY},reader:read:{READ_KEY}"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from shared.local_services import embedded_postgres

    url, handle = embedded_postgres("test-pg")
    yield url
    del handle


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh database for this test run, migrated to head, dropped afterwards."""
    with scratch_database(server_url, "aicash_test") as url:
        os.environ["DATABASE_URL"] = url
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from shared.local_services import embedded_redis

    url, handle = embedded_redis("test-redis")
    yield url
    handle.shutdown()


@pytest.fixture(scope="session")
def sp500() -> OHLCV:
    """Real daily S&P 500 bars 1999-2018 (shipped by the arch package)."""
    from arch.data import sp500

    df = sp500.load()
    ts = df.index.values.astype("datetime64[s]").astype(np.int64)
    return OHLCV(
        ts,
        df["Open"].to_numpy(np.float64),
        df["High"].to_numpy(np.float64),
        df["Low"].to_numpy(np.float64),
        df["Close"].to_numpy(np.float64),
        df["Volume"].to_numpy(np.float64),
    )


@pytest.fixture(scope="session")
def hourly() -> OHLCV:
    from tests.data import generate_bars

    return generate_bars("H1", 3000, seed=42)


def bars_json(bars: OHLCV) -> list[dict[str, object]]:
    return bars_to_rows(bars)


async def asgi_client(app: FastAPI, key: str | None = ADMIN_KEY) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"X-API-Key": key} if key else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client
