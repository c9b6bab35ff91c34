"""All SQL of the trainer: jobs, the model registry and its quality verdicts, validation reports, backtests,
indicator weights, prediction explanations, model flags and retrain decisions."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from services.trainer.schemas import EpochLog, Job, ModelFlags, ModelVersion, Quality

type Conn = asyncpg.Connection | asyncpg.Pool

_JOB_COLUMNS = (
    "id, kind, symbol, timeframe, params, status, progress, history, result, error, attempts, created_at, "
    "started_at, finished_at"
)
# Partial unique index of migration 0002: one queued or running job per series.
ONE_ACTIVE_JOB_INDEX = "training_jobs_one_active"
_VERSION_COLUMNS = (
    "id, symbol, timeframe, version, status, metrics, artifact_uri, sha256, created_at, training_job_id, quality"
)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _job(row: asyncpg.Record) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        symbol=row["symbol"],
        timeframe=row["timeframe"],
        params=_json(row["params"]) or {},
        status=row["status"],
        progress=row["progress"],
        history=[EpochLog.model_validate(h) for h in _json(row["history"]) or []],
        result=_json(row["result"]),
        error=row["error"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def _version(row: asyncpg.Record) -> ModelVersion:
    return ModelVersion(
        id=row["id"],
        symbol=row["symbol"],
        timeframe=row["timeframe"],
        version=row["version"],
        status=row["status"],
        metrics=_json(row["metrics"]) or {},
        artifact_uri=row["artifact_uri"],
        sha256=row["sha256"],
        created_at=row["created_at"],
        training_job_id=row["training_job_id"],
        quality=Quality.model_validate(_json(row["quality"])),
    )


# --- training jobs -------------------------------------------------------------------------------------------


async def create_job(
    conn: Conn, job_id: str, kind: str, symbol: str | None, timeframe: str | None, params: dict[str, Any]
) -> Job:
    row = await conn.fetchrow(
        f"INSERT INTO training_jobs (id, kind, symbol, timeframe, params) VALUES ($1, $2, $3, $4, $5::jsonb) "  # noqa: S608
        f"RETURNING {_JOB_COLUMNS}",
        job_id,
        kind,
        symbol,
        timeframe,
        json.dumps(params),
    )
    assert row is not None
    return _job(row)


async def get_job(conn: Conn, job_id: str) -> Job | None:
    row = await conn.fetchrow(f"SELECT {_JOB_COLUMNS} FROM training_jobs WHERE id = $1", job_id)  # noqa: S608
    return _job(row) if row else None


async def list_jobs(conn: Conn, limit: int = 50) -> list[Job]:
    rows = await conn.fetch(
        f"SELECT {_JOB_COLUMNS} FROM training_jobs ORDER BY created_at DESC LIMIT $1",  # noqa: S608
        limit,
    )
    return [_job(r) for r in rows]


async def try_lock_job(conn: asyncpg.Connection, job_id: str) -> bool:
    """Session-level advisory lock on the job: held while one process works on it, released when that
    process's connection ends (a SIGKILLed worker's lock goes with its connection)."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended('job:' || $1, 0))", job_id))


async def start_attempt(conn: Conn, job_id: str) -> int:
    n = await conn.fetchval(
        "UPDATE training_jobs SET status = 'running', attempts = attempts + 1, progress = 0, history = '[]', "
        "started_at = now(), updated_at = now() WHERE id = $1 RETURNING attempts",
        job_id,
    )
    return int(n)


async def record_epoch(conn: Conn, job_id: str, progress: float, entry: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE training_jobs SET progress = $2, history = history || jsonb_build_array($3::jsonb), "
        "updated_at = now() WHERE id = $1",
        job_id,
        progress,
        json.dumps(entry),
    )


async def set_progress(conn: Conn, job_id: str, progress: float) -> None:
    await conn.execute("UPDATE training_jobs SET progress = $2, updated_at = now() WHERE id = $1", job_id, progress)


async def finish_job(conn: Conn, job_id: str, result: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE training_jobs SET status = 'succeeded', progress = 1, result = $2::jsonb, error = NULL, "
        "finished_at = now(), updated_at = now() WHERE id = $1",
        job_id,
        json.dumps(result),
    )


async def fail_job(conn: Conn, job_id: str, error: str) -> None:
    await conn.execute(
        "UPDATE training_jobs SET status = 'failed', error = $2, finished_at = now(), updated_at = now() "
        "WHERE id = $1 AND status <> 'succeeded'",
        job_id,
        error[:4000],
    )


async def claim_orphans(conn: Conn, stale_after_s: float, limit: int = 100) -> list[tuple[str, str]]:
    """(id, kind) of queued or running jobs whose row has not moved for `stale_after_s` seconds and whose job lock
    nobody holds (no process works on them): their message was lost. Their updated_at is touched, so a
    job is claimed again only after another `stale_after_s` (and concurrent sweepers never claim one twice).
    """
    rows = await conn.fetch(
        """
        UPDATE training_jobs SET updated_at = now()
         WHERE id IN (
            SELECT j.id FROM training_jobs j
             WHERE j.kind IN ('train', 'validate', 'backtest', 'optimize_weights')
               AND j.status IN ('queued', 'running')
               AND j.updated_at < now() - make_interval(secs => $1)
               AND NOT EXISTS (
                   -- the job's session advisory lock (try_lock_job): 64-bit key = classid << 32 | objid
                   SELECT 1 FROM pg_locks l
                    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                      AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended('job:' || j.id, 0))
             ORDER BY j.created_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
        RETURNING id, kind
        """,
        stale_after_s,
        limit,
    )
    return [(str(r["id"]), str(r["kind"])) for r in rows]


async def requeue_job(conn: Conn, job_id: str, error: str) -> None:
    """An attempt failed with an error worth retrying: back to queued, the error kept for the operator."""
    await conn.execute(
        "UPDATE training_jobs SET status = 'queued', error = $2, updated_at = now() WHERE id = $1", job_id, error[:4000]
    )


# --- model registry ------------------------------------------------------------------------------------------


async def version_for_job(conn: Conn, job_id: str) -> ModelVersion | None:
    row = await conn.fetchrow(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE training_job_id = $1",  # noqa: S608
        job_id,
    )
    return _version(row) if row else None


async def register_version(
    conn: asyncpg.Connection,
    *,
    symbol: str,
    timeframe: str,
    version: str,
    metrics: dict[str, Any],
    artifact_uri: str,
    sha256: str,
    training_job_id: str | None,
) -> ModelVersion:
    """Insert the registry row, production if the series has no production model yet, else candidate.

    A production row clears the series' model flags in the same transaction. Idempotent per training job:
    a second call for the same job returns the row written first (and clears nothing).
    """
    async with conn.transaction():
        # Serialise registrations of one series so "is there a production model?" cannot race.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('series:' || $1 || '/' || $2, 0))", symbol, timeframe
        )
        row = await conn.fetchrow(
            f"""
            INSERT INTO model_versions (symbol, timeframe, version, status, metrics, artifact_uri, sha256,
                                        training_job_id)
            VALUES ($1, $2, $3,
                    CASE WHEN EXISTS (SELECT 1 FROM model_versions
                                      WHERE symbol = $1 AND timeframe = $2 AND status = 'production')
                         THEN 'candidate' ELSE 'production' END,
                    $4::jsonb, $5, $6, $7)
            ON CONFLICT (training_job_id) DO NOTHING
            RETURNING {_VERSION_COLUMNS}
            """,  # noqa: S608
            symbol,
            timeframe,
            version,
            json.dumps(metrics),
            artifact_uri,
            sha256,
            training_job_id,
        )
        if row is not None and row["status"] == "production":
            # The new model replaced the one the drift/performance flags were raised against. A candidate
            # leaves them: they still describe the model that serves.
            await clear_flags(conn, symbol, timeframe)
    if row is None:
        assert training_job_id is not None
        existing = await version_for_job(conn, training_job_id)
        assert existing is not None
        return existing
    return _version(row)


async def list_versions(
    conn: Conn, symbol: str | None = None, timeframe: str | None = None, status: str | None = None, limit: int = 200
) -> list[ModelVersion]:
    rows = await conn.fetch(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions "  # noqa: S608
        "WHERE ($1::text IS NULL OR symbol = $1) AND ($2::text IS NULL OR timeframe = $2) "
        "AND ($3::text IS NULL OR status = $3) ORDER BY symbol, timeframe, created_at DESC LIMIT $4",
        symbol,
        timeframe,
        status,
        limit,
    )
    return [_version(r) for r in rows]


async def production_versions(conn: Conn) -> list[ModelVersion]:
    return await list_versions(conn, status="production", limit=10_000)


async def newest_live_versions(conn: Conn) -> dict[tuple[str, str], ModelVersion]:
    """Per series, the newest registered version that did not fail (a candidate awaiting promotion counts)."""
    rows = await conn.fetch(
        f"SELECT DISTINCT ON (symbol, timeframe) {_VERSION_COLUMNS} FROM model_versions "  # noqa: S608
        "WHERE status <> 'failed' ORDER BY symbol, timeframe, created_at DESC, id DESC"
    )
    return {(r["symbol"], r["timeframe"]): _version(r) for r in rows}


# --- flags and retrain decisions -----------------------------------------------------------------------------


async def get_flags(conn: Conn, symbol: str, timeframe: str) -> ModelFlags | None:
    row = await conn.fetchrow(
        "SELECT symbol, timeframe, drift, performance, reason, updated_at FROM model_flags "
        "WHERE symbol = $1 AND timeframe = $2",
        symbol,
        timeframe,
    )
    return ModelFlags(**dict(row)) if row else None


async def set_flags(
    conn: Conn, symbol: str, timeframe: str, *, drift: bool, performance: bool, reason: str | None
) -> None:
    await conn.execute(
        "INSERT INTO model_flags (symbol, timeframe, drift, performance, reason) VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT (symbol, timeframe) DO UPDATE SET drift = EXCLUDED.drift, performance = EXCLUDED.performance, "
        "reason = EXCLUDED.reason, updated_at = now()",
        symbol,
        timeframe,
        drift,
        performance,
        reason,
    )


async def clear_flags(conn: Conn, symbol: str, timeframe: str) -> None:
    await conn.execute(
        "UPDATE model_flags SET drift = false, performance = false, reason = NULL, updated_at = now() "
        "WHERE symbol = $1 AND timeframe = $2",
        symbol,
        timeframe,
    )


async def record_decision(
    conn: Conn,
    symbol: str,
    timeframe: str,
    *,
    retrain: bool,
    reasons: list[str],
    detail: dict[str, Any],
    source_job_id: str | None,
    training_job_id: str | None,
) -> None:
    await conn.execute(
        "INSERT INTO retrain_decisions (symbol, timeframe, retrain, reasons, detail, source_job_id, training_job_id) "
        "VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7)",
        symbol,
        timeframe,
        retrain,
        json.dumps(reasons),
        json.dumps(detail, default=str),
        source_job_id,
        training_job_id,
    )


async def list_decisions(conn: Conn, limit: int = 100) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT symbol, timeframe, decided_at, retrain, reasons, detail, source_job_id, training_job_id "
        "FROM retrain_decisions ORDER BY id DESC LIMIT $1",
        limit,
    )
    return [{**dict(r), "reasons": _json(r["reasons"]), "detail": _json(r["detail"])} for r in rows]


async def active_job_for(conn: Conn, symbol: str, timeframe: str, kind: str = "train") -> str | None:
    """The queued or running job of the series and kind, if any (at most one: index training_jobs_one_active).
    A job whose message was lost is not abandoned: the sweeper re-sends it."""
    value = await conn.fetchval(
        "SELECT id FROM training_jobs WHERE symbol = $1 AND timeframe = $2 AND kind = $3 "
        "AND status IN ('queued', 'running') ORDER BY created_at DESC LIMIT 1",
        symbol,
        timeframe,
        kind,
    )
    return str(value) if value is not None else None


# --- versions by id or name, promotion, quality ---------------------------------------------------------------


async def get_version(conn: Conn, version_id: int) -> ModelVersion | None:
    row = await conn.fetchrow(f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE id = $1", version_id)  # noqa: S608
    return _version(row) if row else None


async def find_version(conn: Conn, symbol: str, timeframe: str, version: str) -> ModelVersion | None:
    row = await conn.fetchrow(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE symbol = $1 AND timeframe = $2 AND version = $3",  # noqa: S608
        symbol,
        timeframe,
        version,
    )
    return _version(row) if row else None


async def production_version(conn: Conn, symbol: str, timeframe: str) -> ModelVersion | None:
    row = await conn.fetchrow(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions "  # noqa: S608
        "WHERE symbol = $1 AND timeframe = $2 AND status = 'production'",
        symbol,
        timeframe,
    )
    return _version(row) if row else None


async def newest_version(conn: Conn, symbol: str, timeframe: str) -> ModelVersion | None:
    """The newest registered version of the series that did not fail."""
    row = await conn.fetchrow(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions "  # noqa: S608
        "WHERE symbol = $1 AND timeframe = $2 AND status <> 'failed' ORDER BY created_at DESC, id DESC LIMIT 1",
        symbol,
        timeframe,
    )
    return _version(row) if row else None


async def set_quality(conn: Conn, version_id: int, quality: dict[str, Any]) -> None:
    await conn.execute("UPDATE model_versions SET quality = $2::jsonb WHERE id = $1", version_id, json.dumps(quality))


async def promote(conn: asyncpg.Connection, version_id: int) -> ModelVersion:
    """Make a version its series' production model: the previous one is archived, the flags cleared (they
    described the model that no longer serves). One transaction, serialised per series."""
    async with conn.transaction():
        row = await conn.fetchrow("SELECT symbol, timeframe FROM model_versions WHERE id = $1 FOR UPDATE", version_id)
        assert row is not None
        symbol, timeframe = row["symbol"], row["timeframe"]
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('series:' || $1 || '/' || $2, 0))", symbol, timeframe
        )
        await conn.execute(
            "UPDATE model_versions SET status = 'archived' "
            "WHERE symbol = $1 AND timeframe = $2 AND status = 'production' AND id <> $3",
            symbol,
            timeframe,
            version_id,
        )
        await conn.execute("UPDATE model_versions SET status = 'production' WHERE id = $1", version_id)
        await clear_flags(conn, symbol, timeframe)
    promoted = await get_version(conn, version_id)
    assert promoted is not None
    return promoted


# --- validation reports ---------------------------------------------------------------------------------------


async def insert_validation(
    conn: Conn,
    *,
    model_version_id: int | None,
    symbol: str,
    timeframe: str,
    job_id: str | None,
    folds: int,
    data_start: Any,
    data_end: Any,
    report: dict[str, Any],
) -> int:
    """Store a report; idempotent per job (a redelivered job finds the report of its first run)."""
    value = await conn.fetchval(
        "INSERT INTO validation_reports (model_version_id, symbol, timeframe, job_id, folds, data_start, data_end, "
        "report) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb) ON CONFLICT (job_id) DO NOTHING RETURNING id",
        model_version_id,
        symbol,
        timeframe,
        job_id,
        folds,
        data_start,
        data_end,
        json.dumps(report, default=str),
    )
    if value is None:
        value = await conn.fetchval("SELECT id FROM validation_reports WHERE job_id = $1", job_id)
    return int(value)


async def validation_for_job(conn: Conn, job_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT id, model_version_id, report FROM validation_reports WHERE job_id = $1", job_id)
    return (
        {"id": row["id"], "model_version_id": row["model_version_id"], "report": _json(row["report"])} if row else None
    )


async def get_validation(conn: Conn, validation_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT id, model_version_id, symbol, timeframe, job_id, folds, data_start, data_end, report, created_at "
        "FROM validation_reports WHERE id = $1",
        validation_id,
    )
    return {**dict(row), "report": _json(row["report"])} if row else None


async def latest_validation(conn: Conn, model_version_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT id, model_version_id, symbol, timeframe, job_id, folds, data_start, data_end, report, created_at "
        "FROM validation_reports WHERE model_version_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        model_version_id,
    )
    return {**dict(row), "report": _json(row["report"])} if row else None


# --- backtests ------------------------------------------------------------------------------------------------


async def insert_backtest(
    conn: Conn,
    *,
    model_version_id: int | None,
    symbol: str,
    timeframe: str,
    job_id: str | None,
    params: dict[str, Any],
    result: dict[str, Any],
    data_start: Any,
    data_end: Any,
) -> int:
    value = await conn.fetchval(
        "INSERT INTO backtests (model_version_id, symbol, timeframe, job_id, params, metrics, trades, equity, "
        "data_start, data_end) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7::jsonb, $8::jsonb, $9, $10) "
        "ON CONFLICT (job_id) DO NOTHING RETURNING id",
        model_version_id,
        symbol,
        timeframe,
        job_id,
        json.dumps(params, default=str),
        json.dumps(result["metrics"], default=str),
        json.dumps(result["trades"], default=str),
        json.dumps(result["equity"], default=str),
        data_start,
        data_end,
    )
    if value is None:
        value = await conn.fetchval("SELECT id FROM backtests WHERE job_id = $1", job_id)
    return int(value)


async def get_backtest(conn: Conn, backtest_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT id, model_version_id, symbol, timeframe, job_id, params, metrics, trades, equity, data_start, "
        "data_end, created_at FROM backtests WHERE id = $1",
        backtest_id,
    )
    if row is None:
        return None
    return {**dict(row), **{k: _json(row[k]) for k in ("params", "metrics", "trades", "equity")}}


# --- indicator weights ----------------------------------------------------------------------------------------


async def insert_weights(
    conn: Conn,
    *,
    symbol: str,
    timeframe: str,
    version: str,
    weights: dict[str, float],
    method: str,
    model_version_id: int | None,
    inputs: dict[str, Any],
    data_start: Any,
    data_end: Any,
) -> int:
    """A new weights version of the series (idempotent per version name: a rerun returns the first row)."""
    value = await conn.fetchval(
        "INSERT INTO indicator_weights (symbol, timeframe, version, weights, method, model_version_id, inputs, "
        "data_start, data_end) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7::jsonb, $8, $9) "
        "ON CONFLICT (symbol, timeframe, version) DO NOTHING RETURNING id",
        symbol,
        timeframe,
        version,
        json.dumps(weights),
        method,
        model_version_id,
        json.dumps(inputs, default=str),
        data_start,
        data_end,
    )
    if value is None:
        value = await conn.fetchval(
            "SELECT id FROM indicator_weights WHERE symbol = $1 AND timeframe = $2 AND version = $3",
            symbol,
            timeframe,
            version,
        )
    return int(value)


async def get_weights(conn: Conn, weights_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT id, symbol, timeframe, version, weights, method, model_version_id, inputs, data_start, data_end, "
        "created_at FROM indicator_weights WHERE id = $1",
        weights_id,
    )
    return {**dict(row), "weights": _json(row["weights"]), "inputs": _json(row["inputs"])} if row else None


async def latest_weights_for_model(conn: Conn, model_version_id: int) -> dict[str, Any] | None:
    value = await conn.fetchval(
        "SELECT id FROM indicator_weights WHERE model_version_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        model_version_id,
    )
    return await get_weights(conn, int(value)) if value is not None else None


# --- prediction explanations ----------------------------------------------------------------------------------


async def get_prediction(conn: Conn, prediction_id: str) -> dict[str, Any] | None:
    """A logged prediction with its raw feature window (None when the id is unknown)."""
    row = await conn.fetchrow(
        "SELECT p.id, p.symbol, p.timeframe, p.bar_ts, p.model_version, p.signal, p.probabilities, "
        "w.features, w.feature_shape FROM predictions p JOIN prediction_windows w USING (window_hash) "
        "WHERE p.id = $1::uuid",
        prediction_id,
    )
    return dict(row) if row else None


async def create_explanation(conn: Conn, prediction_id: str) -> bool:
    """A queued explanation row; False when one exists already (queued, running or done)."""
    value = await conn.fetchval(
        "INSERT INTO prediction_explanations (prediction_id) VALUES ($1::uuid) ON CONFLICT DO NOTHING "
        "RETURNING prediction_id",
        prediction_id,
    )
    return value is not None


async def get_explanation(conn: Conn, prediction_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT prediction_id, status, model_version, contributions, detail, error, attempts, created_at, "
        "finished_at FROM prediction_explanations WHERE prediction_id = $1::uuid",
        prediction_id,
    )
    if row is None:
        return None
    return {
        **dict(row),
        "prediction_id": str(row["prediction_id"]),
        "contributions": _json(row["contributions"]),
        "detail": _json(row["detail"]) or {},
    }


async def start_explanation(conn: Conn, prediction_id: str) -> int | None:
    """Mark a queued (or interrupted running) explanation running; its attempt number, None when done."""
    value = await conn.fetchval(
        "UPDATE prediction_explanations SET status = 'running', attempts = attempts + 1 "
        "WHERE prediction_id = $1::uuid AND status IN ('queued', 'running') RETURNING attempts",
        prediction_id,
    )
    return int(value) if value is not None else None


async def finish_explanation(
    conn: Conn, prediction_id: str, model_version: str, contributions: list[dict[str, Any]], detail: dict[str, Any]
) -> None:
    await conn.execute(
        "UPDATE prediction_explanations SET status = 'succeeded', model_version = $2, contributions = $3::jsonb, "
        "detail = $4::jsonb, error = NULL, finished_at = now() WHERE prediction_id = $1::uuid",
        prediction_id,
        model_version,
        json.dumps(contributions),
        json.dumps(detail, default=str),
    )


async def fail_explanation(conn: Conn, prediction_id: str, error: str) -> None:
    await conn.execute(
        "UPDATE prediction_explanations SET status = 'failed', error = $2, finished_at = now() "
        "WHERE prediction_id = $1::uuid AND status <> 'succeeded'",
        prediction_id,
        error[:4000],
    )
