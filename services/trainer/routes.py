"""HTTP routes of the trainer: queue jobs (train, validate, backtest, optimize_weights), follow them, the model
registry with each version's gate verdict and validation report, backtests, weights, explanations, and the
lifecycle control plane (rollouts, promotion, rollback, the audit trail)."""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse, Response

from services.trainer import lifecycle, publisher, service
from services.trainer import repository as repo
from services.trainer.deps import AdminKey, PoolDep, PublisherDep, ReadKey, SettingsDep, WriteKey
from services.trainer.schemas import (
    AuditPage,
    BacktestOut,
    ExplanationIn,
    ExplanationOut,
    Job,
    JobCreated,
    JobIn,
    ModelDetail,
    ModelStatus,
    ModelVersion,
    PromoteIn,
    RetrainDecision,
    RollbackIn,
    RolloutIn,
    RolloutOut,
    TargetResult,
    ValidationOut,
)
from shared.db import with_retry
from shared.errors import TEXT_SCHEMA, NotFoundError, ServiceUnavailable, error_responses, handler_checked
from shared.query import QueryTime
from shared.rollouts import Rollout
from shared.timeframes import Timeframe, check_symbol

router = APIRouter()


@router.post(
    "/v1/jobs",
    summary="Queue a job",
    tags=["jobs"],
    status_code=202,
    response_model=JobCreated,
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def post_job(
    body: JobIn, pool: PoolDep, settings: SettingsDep, app: PublisherDep, principal: AdminKey
) -> JobCreated:
    """Queue a job (role admin): `train` a model, `validate` a version walk-forward against baselines (the
    promotion gate's evidence), `backtest` a version's or uploaded signals, `optimize_weights` (SHAP weights).

    - 404 when no bars are stored for the symbol on the timeframe or on a lower timeframe it can be
      resampled from; nothing is queued then.
    - 409 `job_in_progress` when the series already has a queued or running job of that kind.
    - 422 when `params` hold an unknown key or a value out of bounds (the detail names the field), e.g. train
      `lstm_units` elements 1..1024, validate `folds` 2..20, backtest `cost_bps` 0..1000, a malformed
      `signals_csv` line.
    - 503 when the broker does not take the message within TRAINER_PUBLISH_TIMEOUT_SECONDS; the job is then
      marked failed (submit it again later).

    The job row and its `job.create` audit row (actor: the API key id) are written in one transaction."""
    job_id = await service.enqueue_job(
        pool, body.kind, body.symbol, body.timeframe, body.params, settings, app, actor=principal.key_id
    )
    return JobCreated(job_id=job_id)


@router.get(
    "/v1/jobs", summary="List recent jobs", tags=["jobs"], response_model=list[Job], responses=error_responses(401, 403)
)
async def get_jobs(pool: PoolDep, _: ReadKey, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[Job]:
    """The newest jobs of every kind, newest first (role read)."""
    return await with_retry(lambda: repo.list_jobs(pool, limit))


@router.get(
    "/v1/jobs/{job_id}",
    summary="A job's status and result",
    tags=["jobs"],
    response_model=Job,
    responses=error_responses(401, 403, 404),
)
async def get_job(job_id: str, pool: PoolDep, _: ReadKey) -> Job:
    """A job's status (queued, running, succeeded, failed), progress 0..1, per-epoch loss and validation
    loss (training), result (the registered version, the validation's verdict, the backtest's metrics...) or
    error (role read)."""
    job = await with_retry(lambda: repo.get_job(pool, job_id))
    if job is None:
        raise NotFoundError(f"no job {job_id!r}")
    return job


@router.get(
    "/v1/models",
    summary="The model registry",
    tags=["models"],
    response_model=list[ModelVersion],
    responses=error_responses(401, 403),
    openapi_extra=handler_checked(symbol=TEXT_SCHEMA),
)
async def get_models(
    pool: PoolDep,
    _: ReadKey,
    symbol: str | None = None,
    timeframe: Timeframe | None = None,
    status: ModelStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[ModelVersion]:
    """The model registry: every registered version with status, headline metrics, artifact URI, the sha256
    of its metadata.json and its `quality` (the promotion gate's verdict: passed, failed or not_validated,
    with reasons) (role read)."""
    tf = timeframe.value if timeframe else None
    return await with_retry(lambda: repo.list_versions(pool, symbol, tf, status, limit))


async def _version_or_404(pool: PoolDep, model_id: int) -> ModelVersion:
    v = await with_retry(lambda: repo.get_version(pool, model_id))
    if v is None:
        raise NotFoundError(f"no model version with id {model_id}")
    return v


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("summary", "folds", "data_start", "data_end", "primary_metric", "pooled", "comparisons", "gate")
    return {k: report[k] for k in keep if k in report}


@router.get(
    "/v1/models/{model_id}",
    summary="A model version with its verdict and business targets",
    tags=["models"],
    response_model=ModelDetail,
    responses=error_responses(401, 403, 404),
)
async def get_model(model_id: int, pool: PoolDep, _: ReadKey) -> ModelDetail:
    """One version with its gate verdict, a summary of its latest walk-forward validation and the design's
    business targets (win rate > 55 %, profit factor > 1.2, max drawdown < 15 %, Sharpe > 0.8,
    accuracy > 65 %), each with its out-of-sample value and pass or fail (role read). Never tuned on test
    data: the figures are those of the stored report."""
    v = await _version_or_404(pool, model_id)
    latest = await with_retry(lambda: repo.latest_validation(pool, model_id))
    report = latest["report"] if latest else None
    targets = [TargetResult.model_validate(t) for t in (report or {}).get("business_targets", [])]
    return ModelDetail(
        **v.model_dump(),
        validation={"id": latest["id"], **_summary(report)} if latest and report else None,
        business_targets=targets,
    )


@router.get(
    "/v1/models/{model_id}/validation",
    summary="A model version's latest walk-forward report",
    tags=["models"],
    response_model=ValidationOut,
    responses=error_responses(401, 403, 404),
)
async def get_model_validation(model_id: int, pool: PoolDep, _: ReadKey) -> ValidationOut:
    """The latest walk-forward report of a version (role read): folds and their boundaries, per-fold and
    pooled metrics of the LSTM and of every baseline (majority, prior, logistic regression, gradient
    boosting), backtest metrics per fold, the paired comparisons with their confidence intervals, the
    business targets and the gate's decision. 404 when the version is unknown or was never validated."""
    await _version_or_404(pool, model_id)
    latest = await with_retry(lambda: repo.latest_validation(pool, model_id))
    if latest is None:
        raise NotFoundError(f"model version {model_id} has no validation yet; queue a validate job")
    return ValidationOut.model_validate(latest)


@router.post(
    "/v1/models/{model_id}/promote",
    summary="Promote a model version to production",
    tags=["models"],
    response_model=ModelVersion,
    responses=error_responses(401, 403, 404, 409, 422),
)
async def promote_model(
    model_id: int, pool: PoolDep, principal: AdminKey, body: Annotated[PromoteIn | None, Body()] = None
) -> ModelVersion:
    """Make a version its series' production model by an admin's explicit decision, whatever the gate said
    (role admin; the body and its `reason` are optional). The previous production model is archived (a later
    rollback returns to it); if the version was the rollout's candidate it leaves the rollout (traffic 0). The
    version keeps its verdict, with a reason added that says an admin promoted it, so clients still see e.g.
    `gate: failed`. One transaction with its `model.promote` audit row; promoting the version that serves
    already changes nothing.

    - 404 for an unknown id.
    - 409 for a failed version (train a new one) or an archived one (a previous production version is reached
      by `POST /v1/models/{symbol}/{timeframe}/rollback`)."""
    async with pool.acquire() as conn:
        return await lifecycle.promote_by_admin(
            conn, model_id, actor=principal.key_id, reason=body.reason if body else None
        )


@router.post(
    "/v1/models/{symbol}/{timeframe}/rollback",
    summary="Roll a series back to its previous production version",
    tags=["models"],
    response_model=ModelVersion,
    responses=error_responses(401, 403, 409, 422),
)
async def rollback_model(
    symbol: str,
    timeframe: Timeframe,
    pool: PoolDep,
    principal: AdminKey,
    body: Annotated[RollbackIn | None, Body()] = None,
) -> ModelVersion:
    """Put the previous production version of the series back into production (role admin; the body and its
    `reason` are optional). The previous one is the newest archived version that served before the current one
    and was not itself rolled back; the current one is archived with `rolled_back_at` set, so rolling back
    again goes one further back, never forth. Returns the version that now serves. One transaction with its
    `model.rollback` audit row.

    - 409 when the series has no production version or no previous one: promote a version instead."""
    reason = body.reason if body and body.reason else "rolled back by an admin"
    async with pool.acquire() as conn:
        return await lifecycle.rollback(conn, symbol, timeframe.value, actor=principal.key_id, reason=reason)


async def _rollout_out(conn: asyncpg.Connection, r: Rollout) -> RolloutOut:
    production = await repo.production_version(conn, r.symbol, r.timeframe)
    candidate = await repo.get_version(conn, r.candidate_model_id) if r.candidate_model_id is not None else None
    return RolloutOut(
        **r.model_dump(),
        production_model_id=production.id if production else None,
        production_version=production.version if production else None,
        candidate_version=candidate.version if candidate else None,
    )


@router.get(
    "/v1/rollouts/{symbol}/{timeframe}",
    summary="A series' rollout",
    tags=["rollouts"],
    response_model=RolloutOut,
    responses=error_responses(401, 403, 422),
)
async def get_rollout(
    symbol: str, timeframe: Timeframe, pool: PoolDep, settings: SettingsDep, _: AdminKey
) -> RolloutOut:
    """A series' rollout (role admin): its policy, the production and candidate versions, the candidate's
    traffic percent, test-group user ids, symbols in rollout and the shadow flag. A series nobody configured
    shows the defaults (policy TRAINER_ROLLOUT_DEFAULT_POLICY, no candidate; `updated_at` null)."""
    check_symbol(symbol)
    async with pool.acquire() as conn:
        r = await lifecycle.get_rollout(conn, symbol, timeframe.value, settings)
        return await _rollout_out(conn, r)


@router.put(
    "/v1/rollouts/{symbol}/{timeframe}",
    summary="Change a series' rollout",
    tags=["rollouts"],
    response_model=RolloutOut,
    responses=error_responses(401, 403, 404, 409, 422),
)
async def put_rollout(
    symbol: str, timeframe: Timeframe, body: RolloutIn, pool: PoolDep, settings: SettingsDep, principal: AdminKey
) -> RolloutOut:
    """Change a series' rollout (role admin): any of `policy`, `candidate_model_id` (null clears it),
    `candidate_traffic_percent`, `test_group_user_ids`, `rollout_symbols`, `shadow`; absent fields keep their
    value. Predictors see the change within seconds (NOTIFY on `model_registry`). One transaction with its
    `rollout.update` audit row (before and after).

    - 404 for an unknown candidate id.
    - 409 for a candidate that is not `candidate` (failed, archived or production already).
    - 422 for an unknown field, a null for a field other than the candidate, a traffic percent outside 0..100,
      or a candidate of another series."""
    async with pool.acquire() as conn:
        r = await lifecycle.update_rollout(
            conn, symbol, timeframe.value, body.changes(), actor=principal.key_id, settings=settings
        )
        return await _rollout_out(conn, r)


@router.get(
    "/v1/audit",
    summary="The audit trail",
    tags=["audit"],
    response_model=AuditPage,
    responses=error_responses(401, 403, 422),
    openapi_extra=handler_checked(symbol=TEXT_SCHEMA, action=TEXT_SCHEMA, actor=TEXT_SCHEMA),
)
async def get_audit(
    pool: PoolDep,
    _: AdminKey,
    symbol: str | None = None,
    timeframe: Timeframe | None = None,
    action: Annotated[str | None, Query(max_length=100, description="e.g. model.promote")] = None,
    actor: Annotated[str | None, Query(max_length=200, description="an API key id or `system`")] = None,
    since: Annotated[QueryTime | None, Query(description="rows at or after this time (ISO 8601)")] = None,
    until: Annotated[QueryTime | None, Query(description="rows before this time (ISO 8601)")] = None,
    before_id: Annotated[int | None, Query(ge=1, description="only rows with a smaller id: the paging cursor")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """The append-only audit trail (role admin): every admin action (promote, rollback, rollout change, job
    creation, manual outcome) and every automatic decision, with who (API key id or `system`), what, the
    affected rows before and after, the evidence and the request id. Newest first (by id, the order rows were
    appended); every filter given must match. Paging: pass the page's `next_before_id` as `before_id` for the
    next, older page (null on the last page); a cursor, so rows appended meanwhile never shift a page."""
    tf = timeframe.value if timeframe else None
    entries = await with_retry(
        lambda: repo.list_audit(
            pool,
            symbol=symbol,
            timeframe=tf,
            action=action,
            actor=actor,
            since=since,
            until=until,
            before_id=before_id,
            limit=limit,
        )
    )
    return AuditPage(entries=entries, next_before_id=entries[-1].id if len(entries) == limit else None)


@router.get(
    "/v1/backtests/{backtest_id}",
    summary="A stored backtest",
    tags=["backtests"],
    response_model=BacktestOut,
    responses=error_responses(401, 403, 404),
)
async def get_backtest(backtest_id: int, pool: PoolDep, _: ReadKey) -> BacktestOut:
    """A stored backtest (role read): its parameters, metrics, trade list and equity curve (at most 2,000
    points)."""
    b = await with_retry(lambda: repo.get_backtest(pool, backtest_id))
    if b is None:
        raise NotFoundError(f"no backtest with id {backtest_id}")
    return BacktestOut.model_validate(b)


@router.get(
    "/v1/weights/{weights_id}/plot.png",
    summary="Plot of stored indicator weights",
    tags=["weights"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(401, 403, 404)},
)
async def get_weights_plot(weights_id: int, pool: PoolDep, _: ReadKey) -> Response:
    """The weights of a stored weights version and the correlation matrix they were computed with, as a PNG
    (role read)."""
    import anyio

    from services.trainer.report import plot_stored_weights

    w = await with_retry(lambda: repo.get_weights(pool, weights_id))
    if w is None:
        raise NotFoundError(f"no indicator weights with id {weights_id}")
    png = await anyio.to_thread.run_sync(plot_stored_weights, w)
    return Response(png, media_type="image/png")


@router.post(
    "/v1/explanations",
    summary="Queue a prediction's explanation",
    tags=["explanations"],
    status_code=202,
    response_model=ExplanationOut,
    responses=error_responses(401, 403, 404, 422, 503),
)
async def post_explanation(
    body: ExplanationIn, pool: PoolDep, settings: SettingsDep, app: PublisherDep, _: WriteKey
) -> JSONResponse:
    """Queue the SHAP explanation of a logged prediction (role write; the predictor calls this when a client
    asks for `GET /v1/predictions/{id}/explanation`). 404 when no such prediction is logged. Idempotent: an
    explanation that exists is not computed again (its current state is returned)."""
    pid = str(body.prediction_id)
    if await with_retry(lambda: repo.get_prediction(pool, pid)) is None:
        raise NotFoundError(f"no logged prediction {pid}")
    created = await repo.create_explanation(pool, pid)
    row = await repo.get_explanation(pool, pid)
    assert row is not None
    if created or row["status"] == "queued":
        try:
            await publisher.publish(app, publisher.EXPLAIN_TASK, [pid], settings)
        except Exception as exc:
            await repo.fail_explanation(pool, pid, f"could not queue the explanation: {type(exc).__name__}")
            raise ServiceUnavailable("the job broker is unavailable; ask for the explanation again later") from exc
    status = 200 if row["status"] in ("succeeded", "failed") else 202
    return JSONResponse(ExplanationOut.model_validate(row).model_dump(mode="json"), status_code=status)


@router.get(
    "/v1/explanations/{prediction_id}",
    summary="A prediction's explanation",
    tags=["explanations"],
    response_model=ExplanationOut,
    responses=error_responses(401, 403, 404),
)
async def get_explanation(prediction_id: str, pool: PoolDep, _: ReadKey) -> ExplanationOut:
    """The state and, once computed, the contributions of a prediction's explanation (role read)."""
    row = await with_retry(lambda: repo.get_explanation(pool, prediction_id)) if _is_uuid(prediction_id) else None
    if row is None:
        raise NotFoundError(f"no explanation for prediction {prediction_id!r}; POST /v1/explanations queues one")
    return ExplanationOut.model_validate(row)


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@router.get(
    "/v1/retrain-decisions",
    summary="Retrain decisions",
    tags=["models"],
    response_model=list[RetrainDecision],
    responses=error_responses(401, 403),
)
async def get_decisions(
    pool: PoolDep, _: ReadKey, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[RetrainDecision]:
    """What the retrain schedules decided for each series, and why (role read)."""
    rows = await with_retry(lambda: repo.list_decisions(pool, limit))
    return [RetrainDecision.model_validate(r) for r in rows]
