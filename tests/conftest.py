"""Suite-wide fixtures: a database of its own for this run (dropped at the end), Redis, real sample data.

DATABASE_URL / REDIS_URL point at running servers (CI and this machine: 127.0.0.1:5432 and :6379); when
unset, embedded servers are started under var/.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from shared.timeframes import OHLCV

ADMIN_KEY = "test-admin-secret-0001"
WRITE_KEY = "test-write-secret-0001"
READ_KEY = "test-read-secret-00001"
API_KEYS = f"admin:admin:{ADMIN_KEY},writer:write:{WRITE_KEY},reader:read:{READ_KEY}"


def _with_db(url: str, db: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


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
    from shared.migrate import upgrade

    name = f"aicash_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = _with_db(server_url, name)
    upgrade(url)
    os.environ["DATABASE_URL"] = url
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


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
    stamps = np.datetime_as_string(bars.ts.astype("datetime64[s]"), unit="s")
    return [
        {"ts": f"{t}Z", "open": o, "high": h, "low": lo, "close": c, "volume": v}
        for t, o, h, lo, c, v in zip(
            stamps.tolist(),
            bars.open.tolist(),
            bars.high.tolist(),
            bars.low.tolist(),
            bars.close.tolist(),
            bars.volume.tolist(),
            strict=True,
        )
    ]


async def asgi_client(app: FastAPI, key: str | None = ADMIN_KEY) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"X-API-Key": key} if key else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client
