"""Running one trainer job exactly once: job lock, bounded attempts, idempotent results.

Every kind (train, validate, backtest, optimize_weights) goes through `run_job`; the kind picks the handler
(training here, the quality jobs in services.trainer.quality_jobs). A finished job can queue a follow-up (a
trained model is validated, a validated production model gets its weights) through the `FollowUp` callback the
caller passes: the worker sends it to the broker, an in-process run leaves it out.

Synchronous (Celery tasks and `aicash train --local` call it); it talks to PostgreSQL through one asyncpg
connection on a private event loop, kept for the whole job because it also holds the job's advisory lock.
A connection that cannot be opened or that drops (PostgreSQL down or restarted) raises DatabaseUnavailable:
nothing more can be recorded, the caller retries the delivery later.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from services.trainer import repository as repo
from services.trainer.artifacts import ArtifactIntegrityError, publish, remove_unregistered, version_string
from services.trainer.dataset import build_dataset
from services.trainer.errors import DatabaseUnavailable, JobBusy, RetryLater
from services.trainer.hyperparameters import FAULT_PARAM, parse_params
from services.trainer.schemas import Job, ModelVersion
from services.trainer.settings import TrainerSettings
from services.trainer.source import load_bars
from shared.db import require_database_url
from shared.errors import AppError
from shared.model_metadata import artifact_prefix
from shared.storage import ObjectStore, open_store
from shared.timeframes import Timeframe

log = logging.getLogger("trainer.jobs")
T = TypeVar("T")
# (kind, job id): publish the message of a job that a finished job created.
FollowUp = Callable[[str, str], None]

# Progress: 5% once the dataset is built, 5-90% over the epochs, 95% once exported, 100% when registered.
_P_DATASET, _P_FIT_END, _P_EXPORTED = 0.05, 0.90, 0.95


# Errors that mean "PostgreSQL is unreachable or the connection is gone", not "the job is wrong". OSError
# covers refused/reset connections and TimeoutError (connect and command timeouts).
DB_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ConnectionFailureError, ...
    asyncpg.InterfaceError,  # "connection is closed"
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


class SyncDb:
    """One asyncpg connection on a private event loop; connection failures become DatabaseUnavailable."""

    def __init__(self, url: str, application_name: str) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.conn: asyncpg.Connection = self.loop.run_until_complete(
                asyncpg.connect(
                    url, timeout=10, command_timeout=60, server_settings={"application_name": application_name}
                )
            )
        except DB_CONNECTION_ERRORS as exc:
            self.loop.close()
            raise DatabaseUnavailable(f"cannot reach PostgreSQL: {type(exc).__name__}: {exc}") from exc

    def run(self, aw: Awaitable[T]) -> T:
        try:
            return self.loop.run_until_complete(aw)
        except DB_CONNECTION_ERRORS as exc:
            raise DatabaseUnavailable(f"lost the PostgreSQL connection: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close(timeout=5))
        except Exception:  # a dead connection: drop it (the server ends the session and its lock)
            self.conn.terminate()
        finally:
            self.loop.close()


def version_result(v: ModelVersion) -> dict[str, Any]:
    return {
        "model_version_id": v.id,
        "symbol": v.symbol,
        "timeframe": v.timeframe,
        "version": v.version,
        "status": v.status,
        "artifact_uri": v.artifact_uri,
        "sha256": v.sha256,
        "metrics": v.metrics,
    }


@dataclass(frozen=True)
class JobContext:
    """What a job handler works with, besides its job and database connection."""

    settings: TrainerSettings
    store: ObjectStore
    follow_up: FollowUp | None


Handler = Callable[[SyncDb, Job, JobContext], dict[str, Any]]


def run_job(
    job_id: str,
    *,
    settings: TrainerSettings,
    store: ObjectStore | None = None,
    retry: bool = True,
    follow_up: FollowUp | None = None,
) -> dict[str, Any]:
    """Run (or finish the bookkeeping of) a training job; safe to call any number of times per job.

    Returns the job's result. Raises JobBusy when another process is working on the job, RetryLater when
    this attempt failed with an error worth retrying (the job is back to queued, attempts counted), and
    DatabaseUnavailable when PostgreSQL cannot be reached or dropped the connection (an attempt that had
    started stays counted; the job row keeps its last state until a later delivery).

    `retry=False` (in-process runs, no broker to retry through): an error worth retrying fails the job.
    """
    # Named after the job, so an operator (and a test) can find the connection holding its lock.
    db = SyncDb(require_database_url(settings), f"aicash-trainer:{job_id}"[:63])
    try:
        if not db.run(repo.try_lock_job(db.conn, job_id)):
            raise JobBusy(f"job {job_id} is being worked on by another process")
        job = db.run(repo.get_job(db.conn, job_id))
        if job is None:
            log.error("job %s does not exist; dropping the message", job_id)
            return {"status": "unknown_job"}
        if job.status in ("succeeded", "failed"):
            log.info("job %s already %s; nothing to do (duplicate delivery)", job_id, job.status)
            return job.result or {"status": job.status, "error": job.error}
        existing = db.run(repo.version_for_job(db.conn, job_id)) if job.kind == "train" else None
        if existing is not None:  # an earlier attempt registered the model and died before saying so
            result = version_result(existing)
            db.run(repo.finish_job(db.conn, job_id, result))
            return result
        if job.attempts >= settings.trainer_max_attempts:
            why = job.error or "the worker process died during each attempt (killed, out of memory or crashed)"
            error = f"gave up after {job.attempts} attempts: {why}"
            db.run(repo.fail_job(db.conn, job_id, error))
            return {"status": "failed", "error": error}
        attempt = db.run(repo.start_attempt(db.conn, job_id))
        log.info("job %s: attempt %d of %d", job_id, attempt, settings.trainer_max_attempts)
        try:
            ctx = JobContext(settings, store or open_store(settings), follow_up)
            result = _handler(job.kind)(db, job, ctx)
        except DatabaseUnavailable:
            raise  # nothing can be written on this connection; the caller retries the delivery
        except AppError as exc:
            if not isinstance(exc, ArtifactIntegrityError):  # the operator must act: no retry
                db.run(repo.fail_job(db.conn, job_id, exc.message))
                return {"status": "failed", "error": exc.message}
            error = f"{type(exc).__name__}: {exc}"
            return _retry_or_fail(db, job_id, attempt, settings, error, retry)
        except Exception as exc:  # anything else may pass: counted and retried, bounded
            log.exception("job %s: attempt %d failed", job_id, attempt)
            return _retry_or_fail(db, job_id, attempt, settings, f"{type(exc).__name__}: {exc}", retry)
        db.run(repo.finish_job(db.conn, job_id, result))
        return result
    finally:
        db.close()  # ends the session: the advisory lock goes with it


def _retry_or_fail(
    db: SyncDb, job_id: str, attempt: int, settings: TrainerSettings, error: str, retry: bool
) -> dict[str, Any]:
    if attempt >= settings.trainer_max_attempts or not retry:
        # Without a broker (retry=False) nothing would ever pick a requeued job up: fail it now.
        msg = f"failed after {attempt} attempts: {error}" if retry else f"failed (in-process run, not retried): {error}"
        db.run(repo.fail_job(db.conn, job_id, msg))
        return {"status": "failed", "error": msg}
    db.run(repo.requeue_job(db.conn, job_id, error))
    raise RetryLater(error)


def _handler(kind: str) -> Handler:
    if kind == "train":
        return _train
    from services.trainer import quality_jobs

    handlers: dict[str, Handler] = {
        "validate": quality_jobs.validate,
        "backtest": quality_jobs.backtest,
        "optimize_weights": quality_jobs.optimize,
    }
    return handlers[kind]


def queue_follow_up(db: SyncDb, job: Job, ctx: JobContext, kind: str, params: dict[str, Any]) -> str | None:
    """Create a job of `kind` for the same series and send it; the id, or None when not possible (in-process
    runs have no broker; a job of that kind already active for the series will see the newest data anyway)."""
    if ctx.follow_up is None:
        return None
    from services.trainer.errors import JobInProgress
    from services.trainer.service import create_job

    assert job.symbol is not None
    assert job.timeframe is not None
    try:
        new_id = db.run(create_job(db.conn, kind, job.symbol, Timeframe(job.timeframe), params, ctx.settings))
    except JobInProgress as exc:
        log.info("job %s: no %s follow-up, job %s is already active", job.id, kind, exc.job_id)
        return exc.job_id
    try:
        ctx.follow_up(kind, new_id)
    except Exception as exc:  # the committed job is re-sent by the sweeper
        log.warning("job %s: follow-up %s %s not sent (%s); the sweeper will send it", job.id, kind, new_id, exc)
    return new_id


def _train(db: SyncDb, job: Job, ctx: JobContext) -> dict[str, Any]:
    from services.trainer import pipeline

    settings, store = ctx.settings, ctx.store

    assert job.symbol is not None
    assert job.timeframe is not None
    fault = job.params.get(FAULT_PARAM) if settings.trainer_fault_injection else None
    if fault == "exit":
        os._exit(70)  # a crash of the process itself (segfault, OOM kill): no Python cleanup runs
    if fault == "raise":
        raise RuntimeError("injected fault")
    cfg = parse_params(job.params, fault_injection=settings.trainer_fault_injection)
    symbol, timeframe = job.symbol, Timeframe(job.timeframe)
    bars, base = db.run(load_bars(db.conn, symbol, timeframe))
    ds = build_dataset(bars, base, timeframe, symbol, cfg)
    db.run(repo.set_progress(db.conn, job.id, _P_DATASET))
    registered = {v.version for v in db.run(repo.list_versions(db.conn, symbol, timeframe.value, limit=100_000))}
    remove_unregistered(store, symbol, timeframe.value, job.id, registered)

    def on_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> None:
        progress = _P_DATASET + (_P_FIT_END - _P_DATASET) * epoch / epochs
        entry: dict[str, float] = {"epoch": epoch}
        entry.update({k: logs[k] for k in ("loss", "val_loss", "accuracy", "val_accuracy") if k in logs})
        db.run(repo.record_epoch(db.conn, job.id, progress, entry))

    created = datetime.now(UTC)
    version = version_string(job.id, created)
    trained = pipeline.train(ds, cfg, version=version, job_id=job.id, created_at=created, on_epoch=on_epoch)
    db.run(repo.set_progress(db.conn, job.id, _P_EXPORTED))
    uri, sha = publish(store, artifact_prefix(symbol, timeframe.value, version), trained.files, trained.metadata)
    metrics = pipeline.summary_metrics(trained.metadata)
    metrics["training_range_end"] = trained.metadata.training_range["end"].isoformat()
    metrics["base_timeframe"] = base.value
    row = db.run(
        repo.register_version(
            db.conn,
            symbol=symbol,
            timeframe=timeframe.value,
            version=version,
            metrics=metrics,
            artifact_uri=uri,
            sha256=sha,
            training_job_id=job.id,
        )
    )
    # Flags are cleared by register_version only when this version became production (see there).
    result = version_result(row)
    result["timings"] = {k: round(v, 3) for k, v in trained.timings.items()}
    result["bars"] = ds.bars
    if settings.trainer_validate_after_train:
        # The gate's verdict comes from walk-forward validation of this version's recipe; until then it is
        # served (if it is the series' first model) as not_validated.
        result["validation_job_id"] = queue_follow_up(
            db, job, ctx, "validate", {"model_version": row.version, "folds": settings.trainer_validation_folds}
        )
    log.info("job %s: registered %s/%s/%s as %s", job.id, symbol, timeframe.value, version, row.status)
    return result
