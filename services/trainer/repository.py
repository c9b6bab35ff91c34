"""All SQL of the trainer: jobs, the model registry and its quality verdicts, validation reports, backtests,
indicator weights, prediction explanations, model flags and retrain decisions."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from services.trainer.schemas import AuditEntry, EpochLog, Job, ModelFlags, ModelVersion, Quality
from shared.rollouts import ROLLOUT_COLUMNS, Rollout

type Conn = asyncpg.Connection | asyncpg.Pool

_JOB_COLUMNS = (
    "id, kind, symbol, timeframe, params, status, progress, history, result, error, attempts, created_at, "
    "started_at, finished_at"
)
# Partial unique index of migration 0002: one queued or running job per series.
ONE_ACTIVE_JOB_INDEX = "training_jobs_one_active"
_VERSION_COLUMNS = (
    "id, symbol, timeframe, version, status, metrics, artifact_uri, sha256, created_at, training_job_id, quality, "
    "promoted_at, retired_at, rolled_back_at"
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
        promoted_at=row["promoted_at"],
        retired_at=row["retired_at"],
        rolled_back_at=row["rolled_back_at"],
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
        await lock_series(conn, symbol, timeframe)
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


# --- the model lifecycle: series lock, status changes, rollouts, the audit trail ---------------------------------


async def lock_series(conn: asyncpg.Connection, symbol: str, timeframe: str) -> None:
    """Transaction-level advisory lock of the series: registration, promotion, rollback and rollout changes of
    one series run one at a time."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('series:' || $1 || '/' || $2, 0))", symbol, timeframe
    )


async def set_status(conn: Conn, version_id: int, status: str, *, rolled_back: bool = False) -> None:
    """Change a version's status (the trigger of migration 0005 keeps promoted_at/retired_at); `rolled_back`
    also stamps rolled_back_at, which takes the version out of every later rollback's reach."""
    await conn.execute(
        "UPDATE model_versions SET status = $2, "
        "rolled_back_at = CASE WHEN $3 THEN clock_timestamp() ELSE rolled_back_at END WHERE id = $1",
        version_id,
        status,
        rolled_back,
    )


async def rollback_target(conn: Conn, symbol: str, timeframe: str, current_id: int | None) -> ModelVersion | None:
    """The version a rollback returns to: the one that served most recently before the current production
    version and was not itself rolled back."""
    row = await conn.fetchrow(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions "  # noqa: S608
        "WHERE symbol = $1 AND timeframe = $2 AND status = 'archived' AND promoted_at IS NOT NULL "
        "AND rolled_back_at IS NULL AND ($3::bigint IS NULL OR id <> $3) "
        "ORDER BY retired_at DESC NULLS LAST, id DESC LIMIT 1",
        symbol,
        timeframe,
        current_id,
    )
    return _version(row) if row else None


def _rollout(row: asyncpg.Record) -> Rollout:
    return Rollout(
        symbol=row["symbol"],
        timeframe=row["timeframe"],
        policy=row["policy"],
        candidate_model_id=row["candidate_model_id"],
        candidate_traffic_percent=row["candidate_traffic_percent"],
        test_group_user_ids=list(row["test_group_user_ids"]),
        rollout_symbols=list(row["rollout_symbols"]),
        shadow=row["shadow"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
    )


async def get_rollout_row(conn: Conn, symbol: str, timeframe: str) -> Rollout | None:
    row = await conn.fetchrow(
        f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE symbol = $1 AND timeframe = $2",  # noqa: S608
        symbol,
        timeframe,
    )
    return _rollout(row) if row else None


async def upsert_rollout(conn: Conn, r: Rollout, updated_by: str) -> Rollout:
    row = await conn.fetchrow(
        f"""
        INSERT INTO rollouts (symbol, timeframe, policy, candidate_model_id, candidate_traffic_percent,
                              test_group_user_ids, rollout_symbols, shadow, updated_at, updated_by)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9)
        ON CONFLICT (symbol, timeframe) DO UPDATE SET
            policy = EXCLUDED.policy, candidate_model_id = EXCLUDED.candidate_model_id,
            candidate_traffic_percent = EXCLUDED.candidate_traffic_percent,
            test_group_user_ids = EXCLUDED.test_group_user_ids, rollout_symbols = EXCLUDED.rollout_symbols,
            shadow = EXCLUDED.shadow, updated_at = now(), updated_by = EXCLUDED.updated_by
        RETURNING {ROLLOUT_COLUMNS}
        """,  # noqa: S608
        r.symbol,
        r.timeframe,
        r.policy,
        r.candidate_model_id,
        r.candidate_traffic_percent,
        r.test_group_user_ids,
        r.rollout_symbols,
        r.shadow,
        updated_by,
    )
    assert row is not None
    return _rollout(row)


async def list_audit(
    conn: Conn,
    *,
    symbol: str | None = None,
    timeframe: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Audit rows matching every filter given, newest (highest id) first; `before_id` pages to older rows."""
    rows = await conn.fetch(
        "SELECT id, at, actor, action, symbol, timeframe, target, before, after, evidence, request_id "
        "FROM audit_log WHERE ($1::text IS NULL OR symbol = $1) AND ($2::text IS NULL OR timeframe = $2) "
        "AND ($3::text IS NULL OR action = $3) AND ($4::text IS NULL OR actor = $4) "
        "AND ($5::timestamptz IS NULL OR at >= $5) AND ($6::timestamptz IS NULL OR at < $6) "
        "AND ($7::bigint IS NULL OR id < $7) ORDER BY id DESC LIMIT $8",
        symbol,
        timeframe,
        action,
        actor,
        since,
        until,
        before_id,
        limit,
    )
    return [AuditEntry(**{**dict(r), **{k: _json(r[k]) for k in ("before", "after", "evidence")}}) for r in rows]


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


# --- the automatic decision (services/trainer/judge.py) -----------------------------------------------------------


async def rollouts_with_candidate(conn: Conn) -> list[Rollout]:
    rows = await conn.fetch(
        f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE candidate_model_id IS NOT NULL ORDER BY symbol, timeframe"  # noqa: S608
    )
    return [_rollout(r) for r in rows]


async def try_lock_judge(conn: asyncpg.Connection, symbol: str, timeframe: str) -> bool:
    """Transaction-level advisory lock of one series' judgement: a second, overlapping judge run skips the
    series instead of deciding it twice."""
    locked: bool = await conn.fetchval(
        "SELECT pg_try_advisory_xact_lock(hashtextextended('judge:' || $1 || '/' || $2, 0))", symbol, timeframe
    )
    return locked


async def candidate_entered_at(conn: Conn, symbol: str, timeframe: str, model_id: int) -> datetime | None:
    """When `model_id` last became the series' rollout candidate (its audit row: rollout.candidate by the
    policy, rollout.update by an admin)."""
    at: datetime | None = await conn.fetchval(
        "SELECT max(at) FROM audit_log WHERE symbol = $1 AND timeframe = $2 "
        "AND action IN ('rollout.candidate', 'rollout.update') "
        "AND (after ->> 'candidate_model_id') = $3::bigint::text "
        "AND (before ->> 'candidate_model_id') IS DISTINCT FROM $3::bigint::text",
        symbol,
        timeframe,
        model_id,
    )
    return at


async def paired_outcomes(
    conn: Conn, symbol: str, timeframe: str, candidate: str, production: str, since: datetime
) -> list[asyncpg.Record]:
    """The bars both versions settled, in bar order: the candidate's outcome (variant candidate or shadow, one
    per bar; settled at or after `since`) next to the production version's production-variant outcome."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        WITH c AS (
            SELECT DISTINCT ON (bar_ts) bar_ts, probabilities, signal, realised_label, realised_log_return, horizon
            FROM bar_outcomes
            WHERE symbol = $1 AND timeframe = $2 AND model_version = $3 AND variant IN ('candidate', 'shadow')
              AND settled_at >= $5
            ORDER BY bar_ts, variant   -- 'candidate' before 'shadow': the same model on the same bar
        )
        SELECT c.bar_ts, c.probabilities AS c_probabilities, c.signal AS c_signal,
               c.realised_label AS c_label, c.realised_log_return AS c_return, c.horizon AS c_horizon,
               p.probabilities AS p_probabilities, p.realised_label AS p_label, p.horizon AS p_horizon
        FROM c JOIN bar_outcomes p
          ON p.symbol = $1 AND p.timeframe = $2 AND p.model_version = $4 AND p.variant = 'production'
         AND p.bar_ts = c.bar_ts
        ORDER BY c.bar_ts
        """,
        symbol,
        timeframe,
        candidate,
        production,
        since,
    )
    return rows


async def insert_rollout_evaluation(
    conn: Conn,
    *,
    symbol: str,
    timeframe: str,
    candidate_version: str,
    production_version: str,
    decision: str,
    pairs: int,
    evidence: dict[str, Any],
) -> int:
    row_id: int = await conn.fetchval(
        "INSERT INTO rollout_evaluations (symbol, timeframe, candidate_version, production_version, decision, "
        "pairs, evidence) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) RETURNING id",
        symbol,
        timeframe,
        candidate_version,
        production_version,
        decision,
        pairs,
        json.dumps(evidence, default=str),
    )
    return row_id


async def list_rollout_evaluations(
    conn: Conn, symbol: str | None = None, timeframe: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, symbol, timeframe, candidate_version, production_version, decision, pairs, evidence, "
        "evaluated_at FROM rollout_evaluations WHERE ($1::text IS NULL OR symbol = $1) "
        "AND ($2::text IS NULL OR timeframe = $2) ORDER BY evaluated_at DESC, id DESC LIMIT $3",
        symbol,
        timeframe,
        limit,
    )
    return [{**dict(r), "evidence": _json(r["evidence"])} for r in rows]
