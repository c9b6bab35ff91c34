"""Creating and queueing trainer jobs (API, CLI and the schedules share this path).

The job row is committed first, then the Celery message is sent: a worker never receives a job id that
is not in PostgreSQL. At most one job per series and kind is queued or running (a partial unique index): a
second one is a 409. The API marks a job failed when its message cannot be sent within
TRAINER_PUBLISH_TIMEOUT_SECONDS (the client gets a 503 and may resubmit); a job left queued without a
message in any other way is re-sent by the sweeper.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

import asyncpg
from celery import Celery

from services.trainer import publisher
from services.trainer import repository as repo
from services.trainer.errors import JobInProgress
from services.trainer.folds import min_bars_for_folds
from services.trainer.hyperparameters import FAULT_PARAM, TrainConfig, parse_params
from services.trainer.job_params import ValidateParams, parse_job_params
from services.trainer.schemas import ModelVersion
from services.trainer.settings import TrainerSettings
from services.trainer.source import resolve_base
from shared import audit
from shared.errors import NotEnoughBars, NotFoundError, ServiceUnavailable
from shared.market_repository import count_bars
from shared.timeframes import Timeframe, check_symbol

log = logging.getLogger("trainer.service")


async def create_job(
    conn: asyncpg.Connection | asyncpg.Pool,
    kind: str,
    symbol: str,
    timeframe: Timeframe,
    params: dict[str, Any],
    settings: TrainerSettings,
    *,
    actor: str = audit.SYSTEM,
) -> str:
    """Validate, check that bars exist (404 otherwise) and insert the queued job; returns its id.

    The job row and its `job.create` audit row are written in one transaction; the actor is an API key id,
    `cli:<user>`, or `system` for the schedules and follow-up jobs. Raises JobInProgress (409) when the series
    already has a queued or running job of this kind.
    """
    check_symbol(symbol)
    parsed = parse_job_params(kind, params, fault_injection=settings.trainer_fault_injection)
    base = await resolve_base(conn, symbol, timeframe)
    if isinstance(parsed, ValidateParams):
        await _check_bars_for_folds(conn, symbol, timeframe, base, parsed)
    job_id = uuid.uuid4().hex
    try:
        await _create_audited(conn, job_id, kind, symbol, timeframe.value, params, actor)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != repo.ONE_ACTIVE_JOB_INDEX:
            raise
        active = await repo.active_job_for(conn, symbol, timeframe.value, kind)
        which = f" (job {active}; follow it with GET /v1/jobs/{active})" if active else ""
        raise JobInProgress(
            f"a {kind} job for {symbol} {timeframe.value} is already queued or running{which}; "
            "queue another once it has finished",
            active,
        ) from None
    return job_id


async def _create_audited(
    conn: asyncpg.Connection | asyncpg.Pool,
    job_id: str,
    kind: str,
    symbol: str,
    timeframe: str,
    params: dict[str, Any],
    actor: str,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        c = await stack.enter_async_context(conn.acquire()) if isinstance(conn, asyncpg.Pool) else conn
        async with c.transaction():
            job = await repo.create_job(c, job_id, kind, symbol, timeframe, params)
            await audit.record(
                c,
                actor=actor,
                action="job.create",
                symbol=symbol,
                timeframe=timeframe,
                target=f"job:{job_id}",
                after={"id": job.id, "kind": job.kind, "status": job.status, "params": _audit_params(job.params)},
            )


def _audit_params(params: dict[str, Any]) -> dict[str, Any]:
    # An uploaded signals CSV can be megabytes: the audit row keeps its size, the job row keeps the text.
    csv = params.get("signals_csv")
    return {**params, "signals_csv": f"<{len(csv)} characters>"} if isinstance(csv, str) else params


async def recipe_of(conn: asyncpg.Connection | asyncpg.Pool, version: ModelVersion | None) -> TrainConfig:
    """The hyperparameters a version was trained with (its training job's params); defaults without one."""
    params: dict[str, Any] = {}
    if version is not None and version.training_job_id:
        job = await repo.get_job(conn, version.training_job_id)
        if job is not None:
            params = {k: v for k, v in job.params.items() if k != FAULT_PARAM}
    return parse_params(params, fault_injection=False)


async def _check_bars_for_folds(
    conn: asyncpg.Connection | asyncpg.Pool, symbol: str, target: Timeframe, base: Timeframe, p: ValidateParams
) -> None:
    """422 before queueing when the series cannot hold the folds (the worker checks the exact count again:
    a resampled series may have fewer completed bars than this estimate)."""
    if p.model_version is not None:
        version = await repo.find_version(conn, symbol, target.value, p.model_version)
        if version is None:
            raise NotFoundError(f"no model version {p.model_version!r} for {symbol} {target.value}")
    else:
        version = await repo.newest_version(conn, symbol, target.value)
    cfg = await recipe_of(conn, version)
    if p.hyperparameters:
        cfg = parse_params({**cfg.model_dump(mode="json"), **p.hyperparameters}, fault_injection=False)
    need = min_bars_for_folds(cfg, p.folds)
    have = await count_bars(conn, symbol, base) * base.seconds // target.seconds
    if have < need:
        source = "" if base is target else f" (about, resampled from {base.value})"
        raise NotEnoughBars(
            f"need at least {need} {target.value} bars for {p.folds} walk-forward folds of {symbol} "
            f"(sequence_length {cfg.sequence_length}, min_sequences {cfg.min_sequences}), have {have}{source}"
        )


async def enqueue_job(
    pool: asyncpg.Pool | asyncpg.Connection,
    kind: str,
    symbol: str,
    timeframe: Timeframe,
    params: dict[str, Any],
    settings: TrainerSettings,
    app: Celery,
    *,
    actor: str = audit.SYSTEM,
) -> str:
    """create_job, then publish its message; a publish that fails marks the job failed and is a 503."""
    job_id = await create_job(pool, kind, symbol, timeframe, params, settings, actor=actor)
    try:
        await publisher.publish(app, publisher.JOB_TASKS[kind], [job_id], settings)
    except Exception as exc:
        why = (
            f"no answer within {settings.trainer_publish_timeout_seconds:g} s"
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
