"""A series with a production model and a rollout candidate, and rollout changes made as the trainer makes
them (SQL on the `rollouts` table), for the predictor's routing tests."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import httpx

from shared.bars import bars_to_rows
from shared.storage import ObjectStore
from tests.data import generate_bars
from tests.predictor.model_factory import register, write_model
from tests.support.keys import WRITE_KEY

# Constant logits: the production model always says BUY, the candidate always SELL, so a response shows
# which one served it even without its model_version.
BUY, SELL = [0.0, 0.0, 60.0], [60.0, 0.0, 0.0]
ROLLOUT_FIELDS = (
    "candidate_model_id",
    "candidate_traffic_percent",
    "test_group_user_ids",
    "rollout_symbols",
    "shadow",
    "policy",
)


async def ingest(indicators_url: str, symbol: str, n_bars: int = 600, seed: int = 13) -> None:
    bars = generate_bars("H1", n_bars, seed=seed)
    async with httpx.AsyncClient(base_url=indicators_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
        r = await c.post(f"/v1/bars/{symbol}/H1", json={"bars": bars_to_rows(bars)})
        assert r.status_code == 200, r.text


async def production_and_candidate(
    database_url: str,
    store: ObjectStore,
    symbol: str,
    scaler: tuple[list[float], list[float]],
    production: str = "p1",
    candidate: str = "c1",
) -> int:
    """Register `production` (BUY) as production and `candidate` (SELL) as a candidate of `symbol` H1;
    returns the candidate's registry id."""
    mean, scale = scaler
    sha = write_model(store, symbol, "H1", production, seed=5, bias=BUY, mean=mean, scale=scale)
    await register(database_url, store, symbol, "H1", production, sha)
    sha = write_model(store, symbol, "H1", candidate, seed=6, bias=SELL, mean=mean, scale=scale)
    await register(database_url, store, symbol, "H1", candidate, sha, status="candidate")
    return await model_id(database_url, symbol, candidate)


async def model_id(database_url: str, symbol: str, version: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT id FROM model_versions WHERE symbol = $1 AND timeframe = 'H1' AND version = $2",
                symbol,
                version,
            )
        )
    finally:
        await conn.close()


async def set_rollout(database_url: str, symbol: str, timeframe: str = "H1", **changes: Any) -> datetime:
    """Insert or update the series' rollouts row with `changes` (other columns keep their value, or the
    table's default on insert); returns its new updated_at."""
    unknown = set(changes) - set(ROLLOUT_FIELDS)
    if unknown:
        raise ValueError(f"not rollouts columns: {sorted(unknown)}")
    cols = list(changes)
    names = ", ".join(["symbol", "timeframe", *cols, "updated_at", "updated_by"])
    params = ", ".join(f"${i}" for i in range(1, len(cols) + 3))
    updates = ", ".join([*(f"{c} = EXCLUDED.{c}" for c in cols), "updated_at = clock_timestamp()"])
    sql = (
        f"INSERT INTO rollouts ({names}) VALUES ({params}, clock_timestamp(), 'tests') "
        f"ON CONFLICT (symbol, timeframe) DO UPDATE SET {updates} RETURNING updated_at"
    )
    conn = await asyncpg.connect(database_url)
    try:
        updated_at: datetime = await conn.fetchval(sql, symbol, timeframe, *changes.values())
        return updated_at
    finally:
        await conn.close()
