"""Scheduled retraining: which series to retrain, and a recorded reason for every decision."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.trainer import repository as repo
from services.trainer.jobs import FAULT_PARAM
from services.trainer.schemas import ModelVersion
from services.trainer.service import create_train_job, send_train
from services.trainer.settings import TrainerSettings, get_trainer_settings
from shared.db import require_database_url
from shared.settings import Settings, get_settings
from shared.timeframes import Timeframe

log = logging.getLogger("trainer.retrain")


async def _params_of(conn: asyncpg.Connection, v: ModelVersion, tsettings: TrainerSettings) -> dict[str, Any]:
    """Retrain with the overrides the current model was trained with (epochs from the schedule if set)."""
    params: dict[str, Any] = {}
    if v.training_job_id:
        job = await repo.get_job(conn, v.training_job_id)
        if job is not None:
            params = {k: val for k, val in job.params.items() if k != FAULT_PARAM}
    if tsettings.scheduled_epochs is not None:
        params["epochs"] = tsettings.scheduled_epochs
    return params


async def _new_bars(conn: asyncpg.Connection, v: ModelVersion) -> int | None:
    end = v.metrics.get("training_range_end")
    if not isinstance(end, str):
        return None
    target = Timeframe(v.timeframe)
    base = Timeframe(str(v.metrics.get("base_timeframe", v.timeframe)))
    n_base = await repo.bars_after(conn, v.symbol, base.value, datetime.fromisoformat(end).timestamp())
    return n_base * base.seconds // target.seconds


async def decide_and_queue(
    conn: asyncpg.Connection, tsettings: TrainerSettings, source_id: str, *, full: bool, now: datetime | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Decide for every series with a production model; returns (decisions, job ids to send).

    Each decision (retrain or not, and why) is written to retrain_decisions.
    """
    now = now or datetime.now(UTC)
    decisions: list[dict[str, Any]] = []
    to_send: list[str] = []
    stale_after_s = float(tsettings.visibility_timeout_seconds)
    for v in await repo.production_versions(conn):
        reasons: list[str] = []
        age_h = (now - v.created_at).total_seconds() / 3600.0
        new_bars = await _new_bars(conn, v)
        flags = await repo.get_flags(conn, v.symbol, v.timeframe)
        detail: dict[str, Any] = {
            "model_version": v.version,
            "model_age_hours": round(age_h, 3),
            "max_model_age_hours": tsettings.max_model_age_hours,
            "new_bars": new_bars,
            "min_new_bars": tsettings.min_new_bars,
            "flag_reason": flags.reason if flags else None,
        }
        if full:
            reasons.append("scheduled_full_retrain")
        else:
            if age_h > tsettings.max_model_age_hours:
                reasons.append("model_age")
            if new_bars is not None and new_bars >= tsettings.min_new_bars:
                reasons.append("new_bars")
            if flags and flags.drift:
                reasons.append("drift_flag")
            if flags and flags.performance:
                reasons.append("performance_flag")
        active = await repo.active_job_for(conn, v.symbol, v.timeframe, stale_after_s)
        job_id: str | None = None
        if reasons and active:
            detail["would_retrain_for"] = reasons
            detail["active_job_id"] = active
            retrain, reasons = False, ["job_in_progress"]
        elif reasons:
            params = await _params_of(conn, v, tsettings)
            job_id = await create_train_job(conn, v.symbol, Timeframe(v.timeframe), params, tsettings)
            to_send.append(job_id)
            retrain = True
        else:
            retrain, reasons = False, ["up_to_date"]
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
    return decisions, to_send


def _run(source_id: str, full: bool, settings: Settings | None, tsettings: TrainerSettings | None) -> dict[str, Any]:
    settings = settings or get_settings()
    tsettings = tsettings or get_trainer_settings()

    async def go() -> tuple[list[dict[str, Any]], list[str]]:
        conn = await asyncpg.connect(
            require_database_url(settings), timeout=10, server_settings={"application_name": "aicash-trainer-beat"}
        )
        try:
            return await decide_and_queue(conn, tsettings, source_id, full=full)
        finally:
            await conn.close()

    decisions, to_send = asyncio.run(go())
    for job_id in to_send:  # after the job rows are committed
        send_train(job_id, tsettings.queue)
    return {"decisions": decisions}


def run_auto_retrain(
    source_id: str, settings: Settings | None = None, tsettings: TrainerSettings | None = None
) -> dict[str, Any]:
    return _run(source_id, False, settings, tsettings)


def run_full_retrain(
    source_id: str, settings: Settings | None = None, tsettings: TrainerSettings | None = None
) -> dict[str, Any]:
    return _run(source_id, True, settings, tsettings)
