"""All SQL of the predictor: registry reads, series stamps, indicator weights, the prediction log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson


@dataclass(frozen=True)
class RegistryRow:
    symbol: str
    timeframe: str
    version: str
    artifact_uri: str
    sha256: str


async def production_models(conn: asyncpg.Pool | asyncpg.Connection) -> list[RegistryRow]:
    rows = await conn.fetch(
        "SELECT symbol, timeframe, version, artifact_uri, sha256 FROM model_versions "
        "WHERE status = 'production' ORDER BY symbol, timeframe"
    )
    return [RegistryRow(r["symbol"], r["timeframe"], r["version"], r["artifact_uri"], r["sha256"]) for r in rows]


@dataclass(frozen=True)
class SeriesStamp:
    """What identifies the stored input window: the newest bar and the last time any bar changed."""

    last_ts: int
    updated_at: datetime
    close: float


async def series_stamp(pool: asyncpg.Pool, symbol: str, timeframe: str) -> SeriesStamp | None:
    row = await pool.fetchrow(
        "SELECT extract(epoch FROM s.last_ts)::bigint AS last_ts, s.updated_at, b.close "
        "FROM series s JOIN bars b ON b.symbol = s.symbol AND b.timeframe = s.timeframe AND b.ts = s.last_ts "
        "WHERE s.symbol = $1 AND s.timeframe = $2",
        symbol,
        timeframe,
    )
    if row is None:
        return None
    return SeriesStamp(int(row["last_ts"]), row["updated_at"], float(row["close"]))


@dataclass(frozen=True)
class WeightsRow:
    symbol: str
    timeframe: str
    version: str
    weights: dict[str, float]


async def latest_weights(pool: asyncpg.Pool) -> list[WeightsRow]:
    """The newest weights row of each (symbol, timeframe) scope, '*' being the default scope."""
    rows = await pool.fetch(
        "SELECT DISTINCT ON (symbol, timeframe) symbol, timeframe, version, weights::text AS weights "
        "FROM indicator_weights ORDER BY symbol, timeframe, created_at DESC, id DESC"
    )
    out: list[WeightsRow] = []
    for r in rows:
        raw = orjson.loads(r["weights"])
        if isinstance(raw, dict):
            weights = {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float)}
            out.append(WeightsRow(r["symbol"], r["timeframe"], r["version"], weights))
    return out


LOG_COLUMNS = (
    "id",
    "created_at",
    "symbol",
    "timeframe",
    "bar_ts",
    "model_version",
    "variant",
    "user_hash",
    "window_hash",
    "features",
    "feature_shape",
    "probabilities",
    "signal",
    "confidence",
    "consensus_signal",
    "cached",
    "request_id",
)


async def copy_predictions(pool: asyncpg.Pool, records: Sequence[tuple[Any, ...]]) -> None:
    async with pool.acquire() as conn:
        await conn.copy_records_to_table("predictions", records=records, columns=LOG_COLUMNS)


async def get_prediction(pool: asyncpg.Pool, prediction_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {', '.join(LOG_COLUMNS)} FROM predictions WHERE id = $1::uuid",  # noqa: S608
        prediction_id,
    )


async def prune_predictions(pool: asyncpg.Pool, retention_days: int, batch_rows: int = 10_000) -> int:
    """Delete rows older than the retention in batches (short locks); only one worker prunes at a time."""
    deleted = 0
    async with pool.acquire() as conn:
        # Any stable 64-bit key: several predictor workers share the database.
        if not await conn.fetchval("SELECT pg_try_advisory_lock(7331003)"):
            return 0
        try:
            while True:
                status = await conn.execute(
                    "DELETE FROM predictions WHERE id IN (SELECT id FROM predictions "
                    "WHERE created_at < now() - make_interval(days => $1) LIMIT $2)",
                    retention_days,
                    batch_rows,
                )
                n = int(status.split()[-1])
                deleted += n
                if n < batch_rows:
                    return deleted
        finally:
            await conn.execute("SELECT pg_advisory_unlock(7331003)")
