"""Creating and queueing training jobs (API, CLI and the retrain schedules share this path).

The job row is committed first, then the Celery message is sent: a worker never receives a job id that
is not in PostgreSQL, and a message that cannot be sent marks its job failed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
import asyncpg

from services.trainer import repository as repo
from services.trainer.jobs import parse_params
from services.trainer.settings import TrainerSettings, get_trainer_settings
from services.trainer.source import resolve_base
from shared.errors import ServiceUnavailable
from shared.timeframes import Timeframe, check_symbol

log = logging.getLogger("trainer.service")
TRAIN_TASK = "trainer.train_model"


async def create_train_job(
    conn: asyncpg.Connection | asyncpg.Pool,
    symbol: str,
    timeframe: Timeframe,
    params: dict[str, Any],
    tsettings: TrainerSettings,
    kind: str = "train",
) -> str:
    """Validate, check that bars exist (404 otherwise) and insert the queued job; returns its id."""
    check_symbol(symbol)
    parse_params(params, fault_injection=tsettings.fault_injection)
    await resolve_base(conn, symbol, timeframe)
    job_id = uuid.uuid4().hex
    await repo.create_job(conn, job_id, kind, symbol, timeframe.value, params)
    return job_id


def send_train(job_id: str, queue: str | None = None) -> None:
    """Publish the Celery message (blocking: kombu). Imports the Celery app, never TensorFlow."""
    from services.trainer.worker import celery_app

    celery_app.send_task(TRAIN_TASK, args=[job_id], queue=queue or get_trainer_settings().queue)


async def enqueue_train(
    pool: asyncpg.Pool | asyncpg.Connection,
    symbol: str,
    timeframe: Timeframe,
    params: dict[str, Any],
    tsettings: TrainerSettings,
) -> str:
    job_id = await create_train_job(pool, symbol, timeframe, params, tsettings)
    try:
        await anyio.to_thread.run_sync(send_train, job_id, tsettings.queue)
    except Exception as exc:
        log.exception("could not queue job %s", job_id)
        await repo.fail_job(pool, job_id, f"could not queue the job: {type(exc).__name__}: {exc}")
        raise ServiceUnavailable(f"the job broker is unavailable: {type(exc).__name__}") from exc
    return job_id
