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


async def series_stamps(pool: asyncpg.Pool, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SeriesStamp]:
    """The stamps of several series in one query (the stamp poll); series without bars are absent."""
    rows = await pool.fetch(
        "SELECT s.symbol, s.timeframe, extract(epoch FROM s.last_ts)::bigint AS last_ts, s.updated_at, b.close "
        "FROM unnest($1::text[], $2::text[]) AS k(symbol, timeframe) "
        "JOIN series s ON s.symbol = k.symbol AND s.timeframe = k.timeframe "
        "JOIN bars b ON b.symbol = s.symbol AND b.timeframe = s.timeframe AND b.ts = s.last_ts",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {
        (r["symbol"], r["timeframe"]): SeriesStamp(int(r["last_ts"]), r["updated_at"], float(r["close"])) for r in rows
    }


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
    "probabilities",
    "signal",
    "confidence",
    "consensus_signal",
    "cached",
    "request_id",
)
WINDOW_COLUMNS = ("window_hash", "created_at", "features", "feature_shape")
# What GET /v1/predictions/{id} shows: the prediction and its window.
RECORD_COLUMNS = (*LOG_COLUMNS, "features", "feature_shape")

_WINDOWS_STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS prediction_windows_staging (
    window_hash text NOT NULL, created_at timestamptz NOT NULL, features real[] NOT NULL,
    feature_shape integer[] NOT NULL
) ON COMMIT DELETE ROWS
"""


async def copy_predictions(
    pool: asyncpg.Pool, records: Sequence[tuple[Any, ...]], windows: Sequence[tuple[Any, ...]] = ()
) -> None:
    """Write new feature windows (once per hash: ON CONFLICT DO NOTHING) and the predictions, in one
    transaction, so a written prediction's window is always there."""
    async with pool.acquire() as conn, conn.transaction():
        if windows:
            await conn.execute(_WINDOWS_STAGING_DDL)
            await conn.copy_records_to_table("prediction_windows_staging", records=windows, columns=WINDOW_COLUMNS)
            await conn.execute(
                "INSERT INTO prediction_windows (window_hash, created_at, features, feature_shape) "
                "SELECT window_hash, created_at, features, feature_shape FROM prediction_windows_staging "
                "ON CONFLICT (window_hash) DO NOTHING"
            )
        await conn.copy_records_to_table("predictions", records=records, columns=LOG_COLUMNS)


async def get_prediction(pool: asyncpg.Pool, prediction_id: str) -> asyncpg.Record | None:
    cols = ", ".join(f"p.{c}" for c in LOG_COLUMNS)
    return await pool.fetchrow(
        f"SELECT {cols}, w.features, w.feature_shape FROM predictions p "  # noqa: S608
        "JOIN prediction_windows w ON w.window_hash = p.window_hash WHERE p.id = $1::uuid",
        prediction_id,
    )


async def prune_predictions(pool: asyncpg.Pool, retention_days: int, batch_rows: int = 10_000) -> tuple[int, int]:
    """Delete predictions older than the retention, then windows older than it that no prediction references
    any more, in batches (short locks); only one worker prunes at a time. Returns (predictions, windows)."""
    deleted = [0, 0]
    statements = (
        "DELETE FROM predictions WHERE id IN (SELECT id FROM predictions "
        "WHERE created_at < now() - make_interval(days => $1) LIMIT $2)",
        "DELETE FROM prediction_windows WHERE window_hash IN (SELECT w.window_hash FROM prediction_windows w "
        "WHERE w.created_at < now() - make_interval(days => $1) AND NOT EXISTS "
        "(SELECT 1 FROM predictions p WHERE p.window_hash = w.window_hash) LIMIT $2)",
    )
    async with pool.acquire() as conn:
        # Any stable 64-bit key: several predictor workers share the database.
        if not await conn.fetchval("SELECT pg_try_advisory_lock(7331003)"):
            return 0, 0
        try:
            for i, sql in enumerate(statements):
                while True:
                    n = int((await conn.execute(sql, retention_days, batch_rows)).split()[-1])
                    deleted[i] += n
                    if n < batch_rows:
                        break
        finally:
            await conn.execute("SELECT pg_advisory_unlock(7331003)")
    return deleted[0], deleted[1]
