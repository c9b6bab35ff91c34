"""The trainer's Celery app: `celery -A services.trainer.celery_app worker -Q training` (and `... beat`).

This module never imports the task code: the worker loads `services.trainer.tasks` through `include`, and
publishers (the API, the CLI, the schedules) send tasks by name through `services.trainer.publisher`. So the
API process has no path to TensorFlow, TA-Lib or the job runner (tests/test_architecture.py keeps it so).

Guarantees (see docs/TRAINER.md): a job's message is acknowledged only after the task returns
(acks_late), is handed back when the worker process dies (task_reject_on_worker_lost), and a worker holds
one message at a time (prefetch 1). A redelivered job is a no-op or a clean rerun: the job row and its
advisory lock in PostgreSQL, and the unique training_job_id of model_versions, make one version per job.
A message lost anyway (PostgreSQL down through every retry, a publish that failed) is re-sent by the
sweeper (`trainer.sweep_jobs`, beat).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.schedules import crontab

from services.trainer.settings import TrainerSettings, get_trainer_settings
from shared import celery_config


def transport_options(url: str, t: TrainerSettings) -> dict[str, Any]:
    """Per broker (shared/celery_config.py); on Redis the message of a job outlives the longest job."""
    # An unacknowledged message is handed out again after visibility_timeout; it must exceed the longest
    # job. unacked_restore_* make a dead worker's message come back promptly once due.
    # (RabbitMQ has no visibility timeout: set the server's consumer_timeout above the longest job.)
    return celery_config.transport_options(
        url,
        timeout_seconds=t.trainer_broker_timeout_seconds,
        visibility_timeout_seconds=t.trainer_visibility_timeout_seconds,
        unacked_restore_interval=t.trainer_unacked_restore_interval_seconds,
        unacked_restore_throttle=1,
    )


def create_celery(settings: TrainerSettings, *, current: bool = False) -> Celery:
    """A configured Celery app (connects lazily, on the first publish or when a worker starts).

    The worker's app (`celery_app`) is the current app; publishers (the API) build their own from their
    settings and close it in their lifespan.
    """
    url = celery_config.broker_url(settings)
    app = Celery("aicash-trainer", set_as_current=current, include=["services.trainer.tasks"])
    app.conf.update(
        **celery_config.base_conf(
            url,
            queue=settings.trainer_queue,
            task_prefix="trainer",
            connection_timeout_seconds=settings.trainer_broker_timeout_seconds,
            transport=transport_options(url, settings),
        ),
        result_serializer="json",
        task_track_started=False,
        beat_schedule={
            "trainer-auto-retrain": {
                "task": "trainer.auto_retrain",
                "schedule": settings.trainer_auto_retrain_interval_hours * 3600.0,
            },
            "trainer-full-retrain": {
                "task": "trainer.full_retrain",
                "schedule": crontab(
                    minute=str(settings.trainer_full_retrain_minute_utc),
                    hour=str(settings.trainer_full_retrain_hour_utc),
                    day_of_week=settings.trainer_full_retrain_day_of_week,
                ),
            },
            "trainer-settle-outcomes": {
                "task": "trainer.settle_outcomes",
                "schedule": settings.trainer_settle_interval_seconds,
                "options": {"expires": settings.trainer_settle_interval_seconds},
            },
            "trainer-judge-rollouts": {
                "task": "trainer.judge_rollouts",
                "schedule": settings.trainer_judge_interval_seconds,
                "options": {"expires": settings.trainer_judge_interval_seconds},
            },
            "trainer-sweep-jobs": {
                "task": "trainer.sweep_jobs",
                "schedule": settings.trainer_sweep_interval_seconds,
                # Sweeps queued behind a long job are dropped rather than run back to back later.
                "options": {"expires": settings.trainer_sweep_interval_seconds},
            },
        },
    )
    return app


# The worker's and beat's app: this module is their entry point, so it reads the process's settings here.
celery_app = create_celery(get_trainer_settings(), current=True)
