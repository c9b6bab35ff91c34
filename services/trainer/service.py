"""Creating and queueing training jobs (API, CLI and the retrain schedules share this path).

The job row is committed first, then the Celery message is sent: a worker never receives a job id that
is not in PostgreSQL. At most one job per series is queued or running (a partial unique index): a second
one is a 409. The API marks a job failed when its message cannot be sent within
TRAINER_PUBLISH_TIMEOUT_SECONDS (the client gets a 503 and may resubmit); a job left queued without a
message in any other way is re-sent by the sweeper.
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any

import anyio
import asyncpg
from celery import Celery

from services.trainer import repository as repo
from services.trainer.errors import JobInProgress
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
    """Validate, check that bars exist (404 otherwise) and insert the queued job; returns its id.

    Raises JobInProgress (409) when the series already has a queued or running job.
    """
    check_symbol(symbol)
    parse_params(params, fault_injection=tsettings.fault_injection)
    await resolve_base(conn, symbol, timeframe)
    job_id = uuid.uuid4().hex
    try:
        await repo.create_job(conn, job_id, kind, symbol, timeframe.value, params)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != repo.ONE_ACTIVE_JOB_INDEX:
            raise
        active = await repo.active_job_for(conn, symbol, timeframe.value)
        which = f" (job {active}; follow it with GET /v1/jobs/{active})" if active else ""
        raise JobInProgress(
            f"a training job for {symbol} {timeframe.value} is already queued or running{which}; "
            "queue another once it has finished",
            active,
        ) from None
    return job_id


def send_train(job_id: str, queue: str | None = None, app: Celery | None = None) -> None:
    """Publish the Celery message (blocking: kombu). Imports the Celery app, never TensorFlow."""
    if app is None:
        from services.trainer.worker import celery_app

        app = celery_app
    assert app is not None
    app.send_task(TRAIN_TASK, args=[job_id], queue=queue or get_trainer_settings().queue)


async def publish_train(job_id: str, tsettings: TrainerSettings, app: Celery | None = None) -> None:
    """send_train in a thread, bounded by TRAINER_PUBLISH_TIMEOUT_SECONDS (TimeoutError past it).

    The broker sockets time out on their own (TRAINER_BROKER_TIMEOUT_SECONDS); the bound is the backstop
    that keeps a request from waiting on a broker that accepts connections and never answers. A thread
    abandoned at the bound ends when its socket times out.
    """
    send = functools.partial(send_train, job_id, tsettings.queue, app)
    with anyio.fail_after(tsettings.publish_timeout_seconds):
        await anyio.to_thread.run_sync(send, abandon_on_cancel=True)


async def enqueue_train(
    pool: asyncpg.Pool | asyncpg.Connection,
    symbol: str,
    timeframe: Timeframe,
    params: dict[str, Any],
    tsettings: TrainerSettings,
    app: Celery | None = None,
) -> str:
    job_id = await create_train_job(pool, symbol, timeframe, params, tsettings)
    try:
        await publish_train(job_id, tsettings, app)
    except Exception as exc:
        why = (
            f"no answer within {tsettings.publish_timeout_seconds:g} s"
            if isinstance(exc, TimeoutError)
            else f"{type(exc).__name__}: {exc}"
        )
        log.warning("could not queue job %s: %s", job_id, why)
        # A message that did reach the broker finds the job failed and is a no-op; the client resubmits.
        await repo.fail_job(pool, job_id, f"could not queue the job: {why}")
        raise ServiceUnavailable(
            f"the job broker is unavailable ({why}); job {job_id} was marked failed, submit it again later"
        ) from exc
    return job_id
