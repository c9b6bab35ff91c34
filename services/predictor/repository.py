"""All SQL of the predictor: registry and rollout reads, indicator weights, the prediction log and explanations (the
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
from shared.rollouts import ROLLOUT_COLUMNS, Rollout

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
class RolloutRow:
    """A `rollouts` row and its candidate's registry row; `candidate` is None when the row names no candidate
    or names one that is not (or no longer) status candidate of the same series."""

    rollout: Rollout
    candidate: RegistryRow | None


async def rollouts(conn: asyncpg.Pool | asyncpg.Connection) -> list[RolloutRow]:
    cols = ", ".join(f"r.{c.strip()}" for c in ROLLOUT_COLUMNS.split(","))
    rows = await conn.fetch(
        f"SELECT {cols}, m.id AS m_id, m.version AS m_version, m.artifact_uri AS m_artifact_uri, "  # noqa: S608
        "m.sha256 AS m_sha256, m.quality::text AS m_quality FROM rollouts r LEFT JOIN model_versions m "
        "ON m.id = r.candidate_model_id AND m.status = 'candidate' AND m.symbol = r.symbol "
        "AND m.timeframe = r.timeframe ORDER BY r.symbol, r.timeframe"
    )
    out: list[RolloutRow] = []
    for r in rows:
        where = f"{r['symbol']} {r['timeframe']}"
        try:
            rollout = Rollout.model_validate({k: r[k] for k in Rollout.model_fields})
        except ValidationError as exc:  # the table's checks make this unlikely; production keeps serving
            log.error("unreadable rollouts row; production serves it", extra={"series": where, "error": str(exc)})
            continue
        candidate = None
        if r["m_id"] is not None:
            candidate = RegistryRow(
                r["symbol"],
                r["timeframe"],
                r["m_version"],
                r["m_artifact_uri"],
                r["m_sha256"],
                r["m_id"],
                parse_quality(r["m_quality"], f"{where} {r['m_version']}"),
            )
        out.append(RolloutRow(rollout, candidate))
    return out


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
# The same columns in the order the binary encoder writes them: per request first, then per cache entry.
BINARY_LOG_COLUMNS = (
    "id",
    "created_at",
    "variant",
    "user_hash",
    "cached",
    "request_id",
    "symbol",
    "timeframe",
    "bar_ts",
    "model_version",
    "window_hash",
    "probabilities",
    "signal",
    "confidence",
    "consensus_signal",
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
    pool: asyncpg.Pool, records: Sequence[tuple[Any, ...]] | bytes, windows: Sequence[tuple[Any, ...]] = ()
) -> None:
    """Write new feature windows (once per hash: ON CONFLICT DO NOTHING) and the predictions, in one
    transaction, so a written prediction's window is always there. `records`: rows of `LOG_COLUMNS`, or binary
    COPY data of `BINARY_LOG_COLUMNS` (`prediction_log.RowEncoder`)."""
    async with pool.acquire() as conn, conn.transaction():
        if windows:
            await conn.execute(_WINDOWS_STAGING_DDL)
            await conn.copy_records_to_table("prediction_windows_staging", records=windows, columns=WINDOW_COLUMNS)
            await conn.execute(
                "INSERT INTO prediction_windows (window_hash, created_at, features, feature_shape) "
                "SELECT window_hash, created_at, features, feature_shape FROM prediction_windows_staging "
                "ON CONFLICT (window_hash) DO NOTHING"
            )
        if isinstance(records, bytes):
            await conn.copy_to_table(
                "predictions", source=memoryview(records), columns=BINARY_LOG_COLUMNS, format="binary"
            )
        else:
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


# --- feature drift (services/predictor/drift.py) ---------------------------------------------------------

FEATURE_DRIFT_COLUMNS = (
    "symbol",
    "timeframe",
    "model_version",
    "feature",
    "psi",
    "ks",
    "live_bars",
    "window_start",
    "window_end",
    "drifted",
)


async def insert_feature_drift(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    if rows:
        await conn.copy_records_to_table("feature_drift", records=rows, columns=FEATURE_DRIFT_COLUMNS)


async def flag_drift(conn: asyncpg.Connection, symbol: str, timeframe: str, reason: str) -> None:
    """Set model_flags.drift (never clears it: promotion does). A performance reason already there is kept and
    the previous drift reason replaced, so the column says why each flag is up."""
    await conn.execute(
        "INSERT INTO model_flags (symbol, timeframe, drift, reason, updated_at) VALUES ($1, $2, true, $3, now()) "
        "ON CONFLICT (symbol, timeframe) DO UPDATE SET drift = true, updated_at = now(), reason = CASE "
        "WHEN model_flags.performance AND model_flags.reason IS NOT NULL THEN concat_ws('; ', NULLIF("
        "regexp_replace(model_flags.reason, '(^|; )drift: [^;]*', '', 'g'), ''), EXCLUDED.reason) "
        "ELSE EXCLUDED.reason END",
        symbol,
        timeframe,
        reason,
    )


async def latest_feature_drift(
    pool: asyncpg.Pool, served: Sequence[tuple[str, str, str]], max_age_seconds: float
) -> list[tuple[str, str, str, float, float, bool]]:
    """(symbol, timeframe, feature, psi, ks, drifted) of the newest check of each served (symbol, timeframe,
    version) no older than `max_age_seconds`."""
    rows = await pool.fetch(
        "SELECT s.symbol, s.timeframe, d.feature, d.psi, d.ks, d.drifted "
        "FROM unnest($1::text[], $2::text[], $3::text[]) AS s(symbol, timeframe, version) "
        "CROSS JOIN LATERAL (SELECT DISTINCT ON (f.feature) f.feature, f.psi, f.ks, f.drifted FROM feature_drift f "
        "WHERE f.symbol = s.symbol AND f.timeframe = s.timeframe AND f.model_version = s.version "
        "AND f.computed_at > now() - make_interval(secs => $4) ORDER BY f.feature, f.computed_at DESC) d",
        [s[0] for s in served],
        [s[1] for s in served],
        [s[2] for s in served],
        float(max_age_seconds),
    )
    return [(r["symbol"], r["timeframe"], r["feature"], r["psi"], r["ks"], r["drifted"]) for r in rows]


async def newest_drift_check(pool: asyncpg.Pool, symbol: str, timeframe: str) -> list[asyncpg.Record]:
    """The rows of the newest drift check of a series (any version), largest PSI first; [] if none."""
    return list(
        await pool.fetch(
            "SELECT model_version, feature, psi, ks, drifted, live_bars, window_start, window_end, computed_at "
            "FROM feature_drift WHERE symbol = $1 AND timeframe = $2 AND computed_at = (SELECT max(computed_at) "
            "FROM feature_drift WHERE symbol = $1 AND timeframe = $2) ORDER BY psi DESC, feature",
            symbol,
            timeframe,
        )
    )


async def model_flag(pool: asyncpg.Pool, symbol: str, timeframe: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT drift, performance, reason FROM model_flags WHERE symbol = $1 AND timeframe = $2", symbol, timeframe
    )
    return row


# --- outcomes and live performance (services/predictor/performance.py) -----------------------------------------


async def series_has_predictions(pool: asyncpg.Pool, symbol: str, timeframe: str) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM predictions WHERE symbol = $1 AND timeframe = $2)", symbol, timeframe
        )
    )


async def prediction_counts(
    pool: asyncpg.Pool, symbol: str, timeframe: str, since: datetime | None
) -> dict[tuple[str, str], int]:
    """Logged predictions per (model_version, variant), served at or after `since`."""
    rows = await pool.fetch(
        "SELECT model_version, variant, count(*) AS n FROM predictions WHERE symbol = $1 AND timeframe = $2 "
        "AND ($3::timestamptz IS NULL OR created_at >= $3) GROUP BY model_version, variant",
        symbol,
        timeframe,
        since,
    )
    return {(r["model_version"], r["variant"]): int(r["n"]) for r in rows}


OUTCOME_COLUMNS = (
    "model_version",
    "variant",
    "bar_ts",
    "probabilities",
    "signal",
    "confidence",
    "realised_label",
    "hit",
    "pnl",
)


async def series_outcomes(
    pool: asyncpg.Pool, symbol: str, timeframe: str, since: datetime | None
) -> list[asyncpg.Record]:
    """Settled outcomes (bar_outcomes) of the series on bars opening at or after `since`, oldest bar first."""
    rows: list[asyncpg.Record] = await pool.fetch(
        f"SELECT {', '.join(OUTCOME_COLUMNS)} FROM bar_outcomes WHERE symbol = $1 AND timeframe = $2 "  # noqa: S608
        "AND ($3::timestamptz IS NULL OR bar_ts >= $3) ORDER BY bar_ts",
        symbol,
        timeframe,
        since,
    )
    return rows


async def external_outcome_totals(
    pool: asyncpg.Pool, symbol: str, timeframe: str, since: datetime | None
) -> dict[tuple[str, str], tuple[int, float | None]]:
    """(count, sum of pnl) of recorded external outcomes per (model_version, variant) of their predictions."""
    rows = await pool.fetch(
        "SELECT p.model_version, p.variant, count(*) AS n, sum(e.pnl) AS pnl FROM external_outcomes e "
        "JOIN predictions p ON p.id = e.prediction_id WHERE p.symbol = $1 AND p.timeframe = $2 "
        "AND ($3::timestamptz IS NULL OR p.created_at >= $3) GROUP BY p.model_version, p.variant",
        symbol,
        timeframe,
        since,
    )
    return {(r["model_version"], r["variant"]): (int(r["n"]), r["pnl"]) for r in rows}


async def prediction_series(conn: asyncpg.Pool | asyncpg.Connection, prediction_id: str) -> asyncpg.Record | None:
    """(symbol, timeframe, model_version, variant) of a logged prediction; None when the id is unknown."""
    return await conn.fetchrow(
        "SELECT symbol, timeframe, model_version, variant FROM predictions WHERE id = $1::uuid", prediction_id
    )


_EXTERNAL_COLUMNS = "prediction_id, pnl, detail::text AS detail, recorded_by, recorded_at"


async def insert_external_outcome(
    conn: asyncpg.Connection, prediction_id: str, pnl: float | None, detail: dict[str, Any], recorded_by: str
) -> asyncpg.Record | None:
    """The new row; None when the prediction has an outcome already (ON CONFLICT DO NOTHING: the first one wins,
    and a concurrent second insert waits for it and does nothing)."""
    return await conn.fetchrow(
        "INSERT INTO external_outcomes (prediction_id, pnl, detail, recorded_by) "  # noqa: S608
        f"VALUES ($1::uuid, $2, $3::jsonb, $4) ON CONFLICT (prediction_id) DO NOTHING RETURNING {_EXTERNAL_COLUMNS}",
        prediction_id,
        pnl,
        orjson.dumps(detail).decode(),
        recorded_by,
    )


async def get_external_outcome(conn: asyncpg.Pool | asyncpg.Connection, prediction_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_EXTERNAL_COLUMNS} FROM external_outcomes WHERE prediction_id = $1::uuid",  # noqa: S608
        prediction_id,
    )


# Each (version, bar) once for the per-version gauges: a bar a candidate scored both in its split and in shadow
# counts once (its production row first, then candidate, then shadow).
_GAUGE_OUTCOMES = """
SELECT model_version, count(*) AS bars, count(*) FILTER (WHERE hit) AS hits, avg(brier) AS brier, sum(pnl) AS pnl
  FROM (SELECT DISTINCT ON (o.symbol, o.timeframe, o.model_version, o.bar_ts) o.model_version, o.hit, o.pnl,
               (o.probabilities[1] - (o.realised_label = 'SELL')::int) ^ 2
             + (o.probabilities[2] - (o.realised_label = 'HOLD')::int) ^ 2
             + (o.probabilities[3] - (o.realised_label = 'BUY')::int) ^ 2 AS brier
          FROM bar_outcomes o
          JOIN model_versions v ON v.symbol = o.symbol AND v.timeframe = o.timeframe AND v.version = o.model_version
         WHERE v.status IN ('production', 'candidate')
         ORDER BY o.symbol, o.timeframe, o.model_version, o.bar_ts,
                  array_position(ARRAY['production', 'candidate', 'shadow'], o.variant)) d
 GROUP BY model_version
"""


async def outcome_gauges(
    pool: asyncpg.Pool,
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    """Per serving version (production or candidate): (bars, hits, mean Brier, sum of pnl) over its distinct
    settled bars, and settled bars per (version, variant)."""
    per_version = await pool.fetch(_GAUGE_OUTCOMES)
    per_variant = await pool.fetch(
        "SELECT o.model_version, o.variant, count(*) AS bars FROM bar_outcomes o JOIN model_versions v "
        "ON v.symbol = o.symbol AND v.timeframe = o.timeframe AND v.version = o.model_version "
        "WHERE v.status IN ('production', 'candidate') GROUP BY o.model_version, o.variant"
    )
    return list(per_version), list(per_variant)
