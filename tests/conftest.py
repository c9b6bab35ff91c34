"""Suite-wide fixtures: a database of its own for this run (dropped at the end), Redis, real sample data.

DATABASE_URL / REDIS_URL point at running servers (CI and this machine: 127.0.0.1:5432 and :6379); when
unset, embedded servers are started under var/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from shared.local_services import scratch_database
from shared.timeframes import OHLCV

# Test modules import helpers from tests.support, never from a conftest.


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


@pytest.fixture(scope="session")
def live_stack(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The whole system as `make up` runs it, started on first use and shared by the session's users of it
    (tests/support/live_stack.py: the README tour, the console in a browser)."""
    from tests.support.live_stack import live_stack as start

    with start(server_url, tmp_path_factory.mktemp("live")) as stack:
        yield stack
