"""Celery app of the trainer: `celery -A services.trainer.worker worker -Q training` (and `... beat`).

Guarantees (see docs/TRAINER.md): a job's message is acknowledged only after the task returns
(acks_late), is handed back when the worker process dies (task_reject_on_worker_lost), and a worker holds
one message at a time (prefetch 1). A redelivered job is a no-op or a clean rerun: the job row and its
advisory lock in PostgreSQL, and the unique training_job_id of model_versions, make one version per job.
"""

from __future__ import annotations

from celery import Celery
from celery.schedules import crontab

from services.trainer.settings import get_trainer_settings
from shared.settings import get_settings


def broker_url() -> str:
    s = get_settings()
    return s.celery_broker_url or s.redis_url or "redis://127.0.0.1:6379/0"


def _create() -> Celery:
    t = get_trainer_settings()
    app = Celery("aicash-trainer")
    app.conf.update(
        broker_url=broker_url(),
        broker_connection_retry_on_startup=True,
        # JSON only: a pickle message is code execution for whoever can write to the broker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Results live in PostgreSQL (training_jobs); no result backend to run or to leak.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=t.queue,
        task_routes={"trainer.*": {"queue": t.queue}},
        task_track_started=False,
        # Redis broker: an unacknowledged message is handed out again after visibility_timeout; it must
        # exceed the longest job. unacked_restore_* make a dead worker's message come back promptly once due.
        # (RabbitMQ ignores these: there set consumer_timeout above the longest job.)
        broker_transport_options={
            "visibility_timeout": t.visibility_timeout_seconds,
            "unacked_restore_interval": t.unacked_restore_interval_seconds,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        beat_schedule={
            "trainer-auto-retrain": {
                "task": "trainer.auto_retrain",
                "schedule": t.auto_retrain_interval_hours * 3600.0,
            },
            "trainer-full-retrain": {
                "task": "trainer.full_retrain",
                "schedule": crontab(
                    minute=str(t.full_retrain_minute_utc),
                    hour=str(t.full_retrain_hour_utc),
                    day_of_week=t.full_retrain_day_of_week,
                ),
            },
        },
    )
    return app


celery_app = _create()

# Registers the tasks on celery_app (tasks imports celery_app from this module, hence at the bottom).
from services.trainer import tasks  # noqa: E402,F401
