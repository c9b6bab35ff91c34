"""HTTP routes of the trainer: queue training jobs, follow them, list the model registry."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import APIRouter, Depends, Query, Request

from services.trainer import repository as repo
from services.trainer import service
from services.trainer.schemas import Job, JobCreated, JobIn, ModelStatus, ModelVersion
from services.trainer.settings import TrainerSettings
from shared.app import PoolDep
from shared.auth import AdminKey, ReadKey
from shared.db import with_retry
from shared.errors import NotFoundError, error_responses
from shared.timeframes import Timeframe

router = APIRouter()


async def get_tsettings(request: Request) -> TrainerSettings:
    return request.app.state.trainer_settings  # type: ignore[no-any-return]


async def get_publisher(request: Request) -> Celery:
    return request.app.state.celery  # type: ignore[no-any-return]


TrainerSettingsDep = Annotated[TrainerSettings, Depends(get_tsettings)]
PublisherDep = Annotated[Celery, Depends(get_publisher)]


@router.post(
    "/v1/jobs",
    tags=["jobs"],
    status_code=202,
    response_model=JobCreated,
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def post_job(
    body: JobIn, pool: PoolDep, tsettings: TrainerSettingsDep, publisher: PublisherDep, _: AdminKey
) -> JobCreated:
    """Queue a training job (role admin).

    - 404 when no bars are stored for the symbol on the timeframe or on a lower timeframe it can be
      resampled from; nothing is queued then.
    - 409 `job_in_progress` when the series already has a queued or running job (the detail names it).
    - 422 when `params` (hyperparameter overrides: `epochs`, `lstm_units`, `horizon`, `dead_band_atr`, ...)
      hold an unknown key or a value out of bounds (e.g. `lstm_units` elements 1..1024, at most 4 layers).
    - 503 when the broker does not take the message within TRAINER_PUBLISH_TIMEOUT_SECONDS; the job is then
      marked failed (submit it again later)."""
    job_id = await service.enqueue_train(pool, body.symbol, body.timeframe, body.params, tsettings, publisher)
    return JobCreated(job_id=job_id)


@router.get("/v1/jobs", tags=["jobs"], response_model=list[Job], responses=error_responses(401, 403))
async def get_jobs(pool: PoolDep, _: ReadKey, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[Job]:
    """The newest training jobs, newest first (role read)."""
    return await with_retry(lambda: repo.list_jobs(pool, limit))


@router.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=Job, responses=error_responses(401, 403, 404))
async def get_job(job_id: str, pool: PoolDep, _: ReadKey) -> Job:
    """A job's status (queued, running, succeeded, failed), progress 0..1, per-epoch loss and validation
    loss, result (the registered model version) or error (role read)."""
    job = await with_retry(lambda: repo.get_job(pool, job_id))
    if job is None:
        raise NotFoundError(f"no training job {job_id!r}")
    return job


@router.get("/v1/models", tags=["models"], response_model=list[ModelVersion], responses=error_responses(401, 403))
async def get_models(
    pool: PoolDep,
    _: ReadKey,
    symbol: str | None = None,
    timeframe: Timeframe | None = None,
    status: ModelStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[ModelVersion]:
    """The model registry: every registered version with status, headline metrics, artifact URI and the
    sha256 of its metadata.json (role read)."""
    tf = timeframe.value if timeframe else None
    return await with_retry(lambda: repo.list_versions(pool, symbol, tf, status, limit))


@router.get("/v1/retrain-decisions", tags=["models"], responses=error_responses(401, 403))
async def get_decisions(
    pool: PoolDep, _: ReadKey, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, object]]:
    """What the retrain schedules decided for each series, and why (role read)."""
    return await with_retry(lambda: repo.list_decisions(pool, limit))
