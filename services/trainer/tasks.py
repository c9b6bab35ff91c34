"""Celery tasks of the trainer. Each takes ids and primitives and is safe to run twice.

Loaded by the worker only (`include` of services.trainer.celery_app); publishers send these by name
(services.trainer.publisher). Heavy code (the job runner, TensorFlow) is imported inside the task bodies.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from services.trainer import publisher
from services.trainer.celery_app import celery_app
from services.trainer.errors import DatabaseUnavailable, JobBusy, RetryLater
from services.trainer.settings import TrainerSettings, get_trainer_settings

log = logging.getLogger("trainer.tasks")

# How long a duplicate delivery waits before looking again whether the job's holder has finished.
BUSY_RETRY_SECONDS = 30.0


def db_retry_delay(failures: int, settings: TrainerSettings) -> float | None:
    """Seconds before the next try of a delivery that found PostgreSQL unreachable `failures` times in a row
    (exponential backoff, capped); None once TRAINER_DB_RETRY_MAX tries are spent."""
    if failures >= settings.trainer_db_retry_max:
        return None
    return float(min(settings.trainer_db_retry_base_seconds * 2**failures, settings.trainer_db_retry_max_delay_seconds))


def _send_follow_up(kind: str, job_id: str) -> None:
    publisher.send_job(celery_app, kind, job_id, get_trainer_settings().trainer_queue)


def _run(self: Task, job_id: str, db_failures: int) -> dict[str, Any]:
    """Run one job (attempts bounded by TRAINER_MAX_ATTEMPTS in PostgreSQL), retrying through Celery.

    `db_failures` counts the consecutive deliveries of this message that could not reach PostgreSQL; it is
    separate from the job's attempts (which PostgreSQL counts, and which an unreachable database cannot).
    """
    from services.trainer.jobs import run_job

    settings = get_trainer_settings()
    try:
        return run_job(job_id, settings=settings, follow_up=_send_follow_up)
    except JobBusy as exc:
        log.info("%s; retrying in %.0f s", exc, BUSY_RETRY_SECONDS)
        raise self.retry(countdown=BUSY_RETRY_SECONDS, kwargs={}) from None
    except RetryLater as exc:
        log.warning("job %s: %s; retrying in %.0f s", job_id, exc, settings.trainer_retry_delay_seconds)
        raise self.retry(countdown=settings.trainer_retry_delay_seconds, kwargs={}) from None
    except DatabaseUnavailable as exc:
        delay = db_retry_delay(db_failures, settings)
        if delay is None:
            # Acknowledged without a result: the job row still says queued/running, and the sweeper re-sends
            # it once PostgreSQL answers again (its lock is free and its row stale).
            log.error(
                "job %s: %s; gave up this delivery after %d retries, the sweeper will re-send the job",
                job_id,
                exc,
                db_failures,
            )
            return {"status": "database_unavailable", "job_id": job_id, "error": str(exc)}
        log.warning(
            "job %s: %s; retry %d of %d in %g s", job_id, exc, db_failures + 1, settings.trainer_db_retry_max, delay
        )
        raise self.retry(countdown=delay, kwargs={"db_failures": db_failures + 1}) from None


@celery_app.task(name="trainer.train_model", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def train_model(self: Task, job_id: str, db_failures: int = 0) -> dict[str, Any]:
    """Train and register one model; then queue its walk-forward validation (TRAINER_VALIDATE_AFTER_TRAIN)."""
    return _run(self, job_id, db_failures)


@celery_app.task(name="trainer.validate_model", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def validate_model(self: Task, job_id: str, db_failures: int = 0) -> dict[str, Any]:
    """Walk-forward validation against baselines; stores the report and applies the promotion gate."""
    return _run(self, job_id, db_failures)


@celery_app.task(name="trainer.backtest", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def backtest(self: Task, job_id: str, db_failures: int = 0) -> dict[str, Any]:
    """Backtest a model version's signals (or uploaded signals) on stored bars; stores the result."""
    return _run(self, job_id, db_failures)


@celery_app.task(name="trainer.optimize_weights", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def optimize_weights(self: Task, job_id: str, db_failures: int = 0) -> dict[str, Any]:
    """SHAP indicator weights of a model version; a new indicator_weights row the predictor picks up."""
    return _run(self, job_id, db_failures)


@celery_app.task(name="trainer.explain_prediction", bind=True, max_retries=3)  # type: ignore[untyped-decorator]
def explain_prediction(self: Task, prediction_id: str) -> dict[str, Any]:
    """SHAP contributions of one logged prediction (row in prediction_explanations)."""
    from services.trainer.quality_jobs import run_explanation

    settings = get_trainer_settings()
    try:
        return run_explanation(prediction_id, settings=settings)
    except DatabaseUnavailable as exc:
        log.warning("explanation %s: %s; retrying in %.0f s", prediction_id, exc, settings.trainer_retry_delay_seconds)
        raise self.retry(countdown=settings.trainer_retry_delay_seconds) from None


@celery_app.task(name="trainer.auto_retrain", bind=True)  # type: ignore[untyped-decorator]
def auto_retrain(self: Task) -> dict[str, Any]:
    """Retrain each series whose newest model is too old, has enough new bars, or is flagged."""
    from services.trainer.retrain import run_auto_retrain

    return run_auto_retrain(source_id=str(self.request.id or "manual"), settings=get_trainer_settings())


@celery_app.task(name="trainer.full_retrain", bind=True)  # type: ignore[untyped-decorator]
def full_retrain(self: Task) -> dict[str, Any]:
    """Retrain every series that has a production model, unconditionally (weekly)."""
    from services.trainer.retrain import run_full_retrain

    return run_full_retrain(source_id=str(self.request.id or "manual"), settings=get_trainer_settings())


@celery_app.task(name="trainer.sweep_jobs", bind=True)  # type: ignore[untyped-decorator]
def sweep_jobs(self: Task) -> dict[str, Any]:
    """Re-send queued/running jobs that nobody works on and whose row went stale (lost messages)."""
    from services.trainer.sweeper import run_sweep

    return run_sweep(send=_send_follow_up, settings=get_trainer_settings())


@celery_app.task(name="trainer.settle_outcomes", bind=True)  # type: ignore[untyped-decorator]
def settle_outcomes(self: Task) -> dict[str, Any]:
    """Settle logged predictions whose horizon bars have arrived (one outcome per version, variant and bar);
    set the performance flag of a series whose live hit rate fell below its validation figure."""
    from services.trainer.settlement import run_settlement

    return run_settlement(settings=get_trainer_settings())


@celery_app.task(name="trainer.judge_rollouts", bind=True)  # type: ignore[untyped-decorator]
def judge_rollouts(self: Task) -> dict[str, Any]:
    """The automatic decision: promote or roll back each series' candidate on paired settled outcomes."""
    from services.trainer.judge import run_judge

    return run_judge(settings=get_trainer_settings())
