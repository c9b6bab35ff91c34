"""Model registry rows for the lifecycle tests (test_lifecycle, test_judge, test_rollout_api): versions with
made-up artifacts, since nothing there loads a model. A plain module: the fixtures stay in tests/trainer/conftest.py.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from services.trainer import repository as repo
from services.trainer.schemas import ModelVersion

TF = "H1"
_series = itertools.count(1)


def series_symbol(prefix: str) -> str:
    """A series of its own for each test (rows of other tests never interfere)."""
    return f"{prefix}{next(_series)}X{uuid.uuid4().hex[:4].upper()}"


async def with_connection[T](database_url: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`fn` on a connection of its own, closed afterwards."""
    conn = await asyncpg.connect(database_url)
    try:
        return await fn(conn)
    finally:
        await conn.close()


async def register_version(conn: asyncpg.Connection, symbol: str, n: int, *, timeframe: str = TF) -> ModelVersion:
    """Version `v<n>-<random>` of the series in the registry, with an artifact URI that points nowhere."""
    return await repo.register_version(
        conn,
        symbol=symbol,
        timeframe=timeframe,
        version=f"v{n}-{uuid.uuid4().hex[:6]}",
        metrics={},
        artifact_uri=f"file://nowhere/{symbol}/{n}",
        sha256="0" * 64,
        training_job_id=None,
    )


async def pass_gate(conn: asyncpg.Connection, v: ModelVersion) -> ModelVersion:
    """Give a version the gate's passing verdict (what quality_jobs.validate stores before apply_policy)."""
    await repo.set_quality(conn, v.id, {"gate": "passed", "reasons": [], "validation_id": None})
    got = await repo.get_version(conn, v.id)
    assert got is not None
    return got
