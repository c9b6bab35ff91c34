"""Scheduled retraining: which series to retrain, and a recorded reason for every decision.

Age and new bars are measured from the series' newest registered version that did not fail, so a retrain
whose candidate awaits the promotion gate counts as recent: the schedule does not queue the same retrain
again every run. Drift/performance flags describe the production model; while a newer candidate awaits
promotion they are kept (the model that serves is still flagged) but do not queue yet another retrain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.trainer import repository as repo
from services.trainer.errors import JobInProgress
from services.trainer.hyperparameters import FAULT_PARAM
from services.trainer.schemas import ModelVersion
from services.trainer.service import create_job
from services.trainer.settings import TrainerSettings
from shared.db import require_database_url
from shared.errors import AppError
from shared.market_repository import bars_after
from shared.timeframes import Timeframe

log = logging.getLogger("trainer.retrain")

Send = Callable[[str], None]


async def _params_of(conn: asyncpg.Connection, v: ModelVersion, settings: TrainerSettings) -> dict[str, Any]:
    """Retrain with the overrides the current model was trained with (epochs from the schedule if set)."""
    params: dict[str, Any] = {}
    if v.training_job_id:
        job = await repo.get_job(conn, v.training_job_id)
        if job is not None:
            params = {k: val for k, val in job.params.items() if k != FAULT_PARAM}
    if settings.trainer_scheduled_epochs is not None:
        params["epochs"] = settings.trainer_scheduled_epochs
    return params


async def _new_bars(conn: asyncpg.Connection, v: ModelVersion) -> int | None:
    end = v.metrics.get("training_range_end")
    if not isinstance(end, str):
        return None
    target = Timeframe(v.timeframe)
    base = Timeframe(str(v.metrics.get("base_timeframe", v.timeframe)))
    n_base = await bars_after(conn, v.symbol, base.value, datetime.fromisoformat(end).timestamp())
    return n_base * base.seconds // target.seconds


async def _queue(
    conn: asyncpg.Connection, v: ModelVersion, settings: TrainerSettings, send: Send, detail: dict[str, Any]
) -> tuple[str | None, str]:
    """Create the job (committed on its own) and send its message at once.

    Returns (job id, "") or (None, why not: "job_in_progress" | "cannot_queue").
    """
    params = await _params_of(conn, v, settings)
    try:
        job_id = await create_job(conn, "train", v.symbol, Timeframe(v.timeframe), params, settings)
    except JobInProgress as exc:  # a concurrent run (or a request) queued one between our check and insert
        detail["active_job_id"] = exc.job_id
        return None, "job_in_progress"
    except AppError as exc:  # e.g. the bars are gone, or old params no longer pass today's bounds
        detail["error"] = exc.message
        return None, "cannot_queue"
    try:
        await asyncio.to_thread(send, job_id)
    except Exception as exc:  # the committed job is re-sent by the sweeper
        log.warning("job %s queued but not sent (%s: %s); the sweeper will send it", job_id, type(exc).__name__, exc)
        detail["send_error"] = f"{type(exc).__name__}: {exc}; the sweeper re-sends the job"
    return job_id, ""


async def decide_and_queue(
    conn: asyncpg.Connection,
    settings: TrainerSettings,
    source_id: str,
    *,
    full: bool,
    send: Send,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Decide for every series with a production model and queue the retrains; returns the decisions.

    Each job is sent right after its row is committed (a crash between two series leaves no job unsent
    that the sweeper would not find), and each decision (retrain or not, and why) is written to
    retrain_decisions.
    """
    now = now or datetime.now(UTC)
    decisions: list[dict[str, Any]] = []
    newest = await repo.newest_live_versions(conn)
    for v in await repo.production_versions(conn):
        basis = newest.get((v.symbol, v.timeframe), v)
        awaiting_promotion = basis.id != v.id and basis.status == "candidate"
        reasons: list[str] = []
        age_h = (now - basis.created_at).total_seconds() / 3600.0
        new_bars = await _new_bars(conn, basis)
        flags = await repo.get_flags(conn, v.symbol, v.timeframe)
        flag_reasons = []
        if flags and flags.drift:
            flag_reasons.append("drift_flag")
        if flags and flags.performance:
            flag_reasons.append("performance_flag")
        detail: dict[str, Any] = {
            "model_version": v.version,
            "basis_version": basis.version,
            "basis_status": basis.status,
            "model_age_hours": round(age_h, 3),
            "max_model_age_hours": settings.trainer_max_model_age_hours,
            "new_bars": new_bars,
            "min_new_bars": settings.trainer_min_new_bars,
            "flag_reason": flags.reason if flags else None,
        }
        if full:
            reasons.append("scheduled_full_retrain")
        else:
            if age_h > settings.trainer_max_model_age_hours:
                reasons.append("model_age")
            if new_bars is not None and new_bars >= settings.trainer_min_new_bars:
                reasons.append("new_bars")
            if awaiting_promotion and flag_reasons:
                # The candidate is the retrain that answers these flags; the promotion gate decides.
                detail["flags_pending_promotion"] = flag_reasons
            else:
                reasons.extend(flag_reasons)
        job_id: str | None = None
        if reasons:
            active = await repo.active_job_for(conn, v.symbol, v.timeframe)
            if active is None:
                job_id, why_not = await _queue(conn, v, settings, send, detail)
            else:
                detail["active_job_id"], why_not = active, "job_in_progress"
            if job_id is None:
                detail["would_retrain_for"] = reasons
                reasons = [why_not]
        elif awaiting_promotion:
            reasons = ["recently_retrained"]
        else:
            reasons = ["up_to_date"]
        retrain = job_id is not None
        await repo.record_decision(
            conn,
            v.symbol,
            v.timeframe,
            retrain=retrain,
            reasons=reasons,
            detail=detail,
            source_job_id=source_id,
            training_job_id=job_id,
        )
        decisions.append(
            {
                "symbol": v.symbol,
                "timeframe": v.timeframe,
                "retrain": retrain,
                "reasons": reasons,
                "training_job_id": job_id,
            }
        )
        log.info("%s %s/%s: retrain=%s reasons=%s", "full" if full else "auto", v.symbol, v.timeframe, retrain, reasons)
    return decisions


def _send_job(kind: str, job_id: str, settings: TrainerSettings) -> None:
    from services.trainer import publisher
    from services.trainer.celery_app import celery_app  # the worker's (current) app; never the task module

    publisher.send_job(celery_app, kind, job_id, settings.trainer_queue)


SendKind = Callable[[str, str], None]


async def queue_stale_quality(
    conn: asyncpg.Connection, settings: TrainerSettings, send: SendKind, symbol: str | None = None
) -> list[dict[str, Any]]:
    """Every production model still `not_validated` gets a validate job, and every production model without
    weights of its own an optimize_weights job (what the 6-hourly run does besides retraining). A series
    with such a job already active is left alone. `symbol` limits the look to one symbol (tests)."""
    queued: list[dict[str, Any]] = []
    for v in await repo.production_versions(conn):
        if symbol is not None and v.symbol != symbol:
            continue
        wanted: list[tuple[str, dict[str, Any]]] = []
        if v.quality.gate == "not_validated" and settings.trainer_validate_after_train:
            wanted.append(("validate", {"model_version": v.version, "folds": settings.trainer_validation_folds}))
        elif await repo.latest_weights_for_model(conn, v.id) is None and settings.trainer_weights_after_validate:
            wanted.append(("optimize_weights", {"model_version": v.version}))
        for kind, params in wanted:
            try:
                job_id = await create_job(conn, kind, v.symbol, Timeframe(v.timeframe), params, settings)
            except JobInProgress:
                continue
            except AppError as exc:  # e.g. too few bars for the folds: recorded in the result, not retried
                queued.append({"symbol": v.symbol, "timeframe": v.timeframe, "kind": kind, "error": exc.message})
                continue
            try:
                await asyncio.to_thread(send, kind, job_id)
            except Exception as exc:  # the committed job is re-sent by the sweeper
                log.warning("%s job %s queued but not sent (%s); the sweeper will send it", kind, job_id, exc)
            queued.append({"symbol": v.symbol, "timeframe": v.timeframe, "kind": kind, "job_id": job_id})
    return queued


def _run(source_id: str, full: bool, settings: TrainerSettings, send: Send | None) -> dict[str, Any]:
    sender: Send = send or (lambda job_id: _send_job("train", job_id, settings))

    async def go() -> dict[str, Any]:
        conn = await asyncpg.connect(
            require_database_url(settings), timeout=10, server_settings={"application_name": "aicash-trainer-beat"}
        )
        try:
            decisions = await decide_and_queue(conn, settings, source_id, full=full, send=sender)
            quality: list[dict[str, Any]] = []
            if send is None:  # a caller's own sender sends training jobs only (tests of the decisions)
                quality = await queue_stale_quality(conn, settings, lambda k, j: _send_job(k, j, settings))
            return {"decisions": decisions, "quality_jobs": quality}
        finally:
            await conn.close()

    return asyncio.run(go())


def run_auto_retrain(source_id: str, settings: TrainerSettings, send: Send | None = None) -> dict[str, Any]:
    return _run(source_id, False, settings, send)


def run_full_retrain(source_id: str, settings: TrainerSettings, send: Send | None = None) -> dict[str, Any]:
    return _run(source_id, True, settings, send)
