"""Celery tasks of the trainer. Each takes ids and primitives and is safe to run twice."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from services.trainer.errors import JobBusy, RetryLater
from services.trainer.settings import get_trainer_settings
from services.trainer.worker import celery_app

log = logging.getLogger("trainer.tasks")

# How long a duplicate delivery waits before looking again whether the job's holder has finished.
BUSY_RETRY_SECONDS = 30.0


@celery_app.task(name="trainer.train_model", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def train_model(self: Task, job_id: str) -> dict[str, Any]:
    """Train one model for a queued job (attempts bounded by TRAINER_MAX_ATTEMPTS in PostgreSQL)."""
    from services.trainer.jobs import run_job

    try:
        return run_job(job_id)
    except JobBusy as exc:
        log.info("%s; retrying in %.0f s", exc, BUSY_RETRY_SECONDS)
        raise self.retry(countdown=BUSY_RETRY_SECONDS) from None
    except RetryLater as exc:
        delay = get_trainer_settings().retry_delay_seconds
        log.warning("job %s: %s; retrying in %.0f s", job_id, exc, delay)
        raise self.retry(countdown=delay) from None


@celery_app.task(name="trainer.auto_retrain", bind=True)  # type: ignore[untyped-decorator]
def auto_retrain(self: Task) -> dict[str, Any]:
    """Retrain each series whose production model is too old, has enough new bars, or is flagged."""
    from services.trainer.retrain import run_auto_retrain

    return run_auto_retrain(source_id=str(self.request.id or "manual"))


@celery_app.task(name="trainer.full_retrain", bind=True)  # type: ignore[untyped-decorator]
def full_retrain(self: Task) -> dict[str, Any]:
    """Retrain every series that has a production model, unconditionally (weekly)."""
    from services.trainer.retrain import run_full_retrain

    return run_full_retrain(source_id=str(self.request.id or "manual"))
