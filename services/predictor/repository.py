"""All SQL of the predictor: registry reads, indicator weights, the prediction log and explanations (the
series stamps read `bars`: they live with the other market-data SQL in `shared/market_repository.py`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from pydantic import ValidationError

from shared.model_metadata import ModelQuality

log = logging.getLogger("predictor.repository")


@dataclass(frozen=True)
class RegistryRow:
    symbol: str
    timeframe: str
    version: str
    artifact_uri: str
    sha256: str
    id: int = 0
    quality: ModelQuality = field(default_factory=lambda: ModelQuality(gate="not_validated"))


def parse_quality(raw: str | None, where: str) -> ModelQuality:
    """`model_versions.quality` as a ModelQuality; an unreadable one is served as not validated, saying so
    (never as passed, and never by refusing a model that the registry made production)."""
    if raw is None:
        return ModelQuality(gate="not_validated", reasons=[f"{where} has no quality verdict"])
    try:
        return ModelQuality.model_validate_json(raw)
    except ValidationError as exc:
        log.error("unreadable quality verdict; serving it as not_validated", extra={"model": where, "error": str(exc)})
        return ModelQuality(
            gate="not_validated", reasons=[f"the quality verdict of {where} is unreadable: {raw[:200]}"]
        )


async def production_models(conn: asyncpg.Pool | asyncpg.Connection) -> list[RegistryRow]:
    rows = await conn.fetch(
        "SELECT id, symbol, timeframe, version, artifact_uri, sha256, quality::text AS quality FROM model_versions "
        "WHERE status = 'production' ORDER BY symbol, timeframe"
    )
    return [
        RegistryRow(
            r["symbol"],
            r["timeframe"],
            r["version"],
            r["artifact_uri"],
            r["sha256"],
            r["id"],
            parse_quality(r["quality"], f"{r['symbol']} {r['timeframe']} {r['version']}"),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class WeightsRow:
    symbol: str
    timeframe: str
    version: str
    weights: dict[str, float]
    id: int | None = None
    method: str = "manual"
    model_version_id: int | None = None
    # {"importances": {...}, "correlation": [[...]], "feature_names": [...], "hit_rates": {...}, ...}
    inputs: dict[str, Any] = field(default_factory=dict)
    data_start: datetime | None = None
    data_end: datetime | None = None
    created_at: datetime | None = None


async def latest_weights(pool: asyncpg.Pool) -> list[WeightsRow]:
    """The newest weights row of each (symbol, timeframe) scope, '*' being the default scope."""
    rows = await pool.fetch(
        "SELECT DISTINCT ON (symbol, timeframe) id, symbol, timeframe, version, weights::text AS weights, method, "
        "model_version_id, inputs::text AS inputs, data_start, data_end, created_at "
        "FROM indicator_weights ORDER BY symbol, timeframe, created_at DESC, id DESC"
    )
    out: list[WeightsRow] = []
    for r in rows:
        raw = orjson.loads(r["weights"])
        if not isinstance(raw, dict):
            log.error("indicator_weights row %s: weights is not an object; ignored", r["id"])
            continue
        weights = {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float)}
        inputs = orjson.loads(r["inputs"])
        out.append(
            WeightsRow(
                r["symbol"],
                r["timeframe"],
                r["version"],
                weights,
                id=r["id"],
                method=r["method"],
                model_version_id=r["model_version_id"],
                inputs=inputs if isinstance(inputs, dict) else {},
                data_start=r["data_start"],
                data_end=r["data_end"],
                created_at=r["created_at"],
            )
        )
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


async def prediction_exists(pool: asyncpg.Pool, prediction_id: str) -> bool:
    return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM predictions WHERE id = $1::uuid)", prediction_id))


@dataclass(frozen=True)
class ExplanationRow:
    """A row of `prediction_explanations`, the trainer's output contract."""

    prediction_id: str
    status: str  # queued, running, succeeded, failed
    model_version: str | None
    contributions: list[dict[str, Any]] | None
    detail: dict[str, Any]
    error: str | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None


async def get_explanation(pool: asyncpg.Pool, prediction_id: str) -> ExplanationRow | None:
    r = await pool.fetchrow(
        "SELECT prediction_id, status, model_version, contributions::text AS contributions, detail::text AS detail, "
        "error, attempts, created_at, finished_at FROM prediction_explanations WHERE prediction_id = $1::uuid",
        prediction_id,
    )
    if r is None:
        return None
    contributions = orjson.loads(r["contributions"]) if r["contributions"] is not None else None
    detail = orjson.loads(r["detail"])
    return ExplanationRow(
        str(r["prediction_id"]),
        r["status"],
        r["model_version"],
        contributions if isinstance(contributions, list) else None,
        detail if isinstance(detail, dict) else {},
        r["error"],
        r["attempts"],
        r["created_at"],
        r["finished_at"],
    )


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
