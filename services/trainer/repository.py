"""All SQL of the trainer: training jobs, the model registry, model flags and retrain decisions."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from services.trainer.schemas import EpochLog, Job, ModelFlags, ModelVersion

type Conn = asyncpg.Connection | asyncpg.Pool

_JOB_COLUMNS = (
    "id, kind, symbol, timeframe, params, status, progress, history, result, error, attempts, created_at, "
    "started_at, finished_at"
)
# Partial unique index of migration 0002: one queued or running job per series.
ONE_ACTIVE_JOB_INDEX = "training_jobs_one_active"
_VERSION_COLUMNS = "id, symbol, timeframe, version, status, metrics, artifact_uri, sha256, created_at, training_job_id"


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


async def unlock_job(conn: asyncpg.Connection, job_id: str) -> None:
    await conn.execute("SELECT pg_advisory_unlock(hashtextextended('job:' || $1, 0))", job_id)


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


async def claim_orphans(conn: Conn, stale_after_s: float, limit: int = 100) -> list[str]:
    """Queued or running train jobs whose row has not moved for `stale_after_s` seconds and whose job lock
    nobody holds (no process works on them): their message was lost. Their updated_at is touched, so a
    job is claimed again only after another `stale_after_s` (and concurrent sweepers never claim one twice).
    """
    rows = await conn.fetch(
        """
        UPDATE training_jobs SET updated_at = now()
         WHERE id IN (
            SELECT j.id FROM training_jobs j
             WHERE j.kind = 'train' AND j.status IN ('queued', 'running')
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
        RETURNING id
        """,
        stale_after_s,
        limit,
    )
    return [str(r["id"]) for r in rows]


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


async def active_job_for(conn: Conn, symbol: str, timeframe: str) -> str | None:
    """The queued or running job of the series, if any (at most one: index training_jobs_one_active).
    A job whose message was lost is not abandoned: the sweeper re-sends it."""
    value = await conn.fetchval(
        "SELECT id FROM training_jobs WHERE symbol = $1 AND timeframe = $2 "
        "AND status IN ('queued', 'running') ORDER BY created_at DESC LIMIT 1",
        symbol,
        timeframe,
    )
    return str(value) if value is not None else None


async def bars_after(conn: Conn, symbol: str, timeframe: str, after_epoch_s: float) -> int:
    n = await conn.fetchval(
        "SELECT count(*) FROM bars WHERE symbol = $1 AND timeframe = $2 AND ts > to_timestamp($3)",
        symbol,
        timeframe,
        after_epoch_s,
    )
    return int(n or 0)
