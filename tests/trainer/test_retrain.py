"""Auto-retrain decisions (recorded with their reasons) and the Celery configuration."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from services.trainer import repository as repo
from services.trainer.retrain import decide_and_queue
from services.trainer.settings import TrainerSettings


def _mine(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in decisions if d["symbol"] == "SPXTRAIN" and d["timeframe"] == "D1"]
    assert len(found) == 1
    return found[0]


async def test_auto_retrain_records_why_it_did_or_did_not_retrain(trained: dict[str, Any], database_url: str) -> None:
    tsettings = TrainerSettings(max_model_age_hours=24, min_new_bars=50)
    conn = await asyncpg.connect(database_url)
    try:
        first = _mine((await decide_and_queue(conn, tsettings, "beat-1", full=False))[0])
        assert first == {
            "symbol": "SPXTRAIN",
            "timeframe": "D1",
            "retrain": False,
            "reasons": ["up_to_date"],
            "training_job_id": None,
        }

        # A later issue's drift monitor raises the flag; the next run retrains and says why.
        await repo.set_flags(conn, "SPXTRAIN", "D1", drift=True, performance=False, reason="PSI 0.31 on rsi_14")
        second = _mine((await decide_and_queue(conn, tsettings, "beat-2", full=False))[0])
        assert second["retrain"] is True and second["reasons"] == ["drift_flag"]
        job = await repo.get_job(conn, second["training_job_id"])
        assert job is not None and job.status == "queued" and job.params["lstm_units"] == [8, 8]

        # While that job is pending, neither schedule piles up another one.
        third = _mine((await decide_and_queue(conn, tsettings, "beat-3", full=False))[0])
        assert third["retrain"] is False and third["reasons"] == ["job_in_progress"]
        full = _mine((await decide_and_queue(conn, tsettings, "beat-4", full=True))[0])
        assert full["reasons"] == ["job_in_progress"]

        # An old model is retrained for its age alone.
        await repo.fail_job(conn, second["training_job_id"], "test: cancelled")
        await repo.clear_flags(conn, "SPXTRAIN", "D1")
        aged = TrainerSettings(max_model_age_hours=1e-6, min_new_bars=10**6)
        fourth = _mine((await decide_and_queue(conn, aged, "beat-5", full=False))[0])
        assert fourth["retrain"] is True and fourth["reasons"] == ["model_age"]
        await repo.fail_job(conn, fourth["training_job_id"], "test: cancelled")

        rows = await conn.fetch(
            "SELECT retrain, reasons, detail, source_job_id FROM retrain_decisions "
            "WHERE symbol = 'SPXTRAIN' AND timeframe = 'D1' ORDER BY id"
        )
    finally:
        await conn.close()
    assert [r["source_job_id"] for r in rows] == ["beat-1", "beat-2", "beat-3", "beat-4", "beat-5"]
    assert '"flag_reason": "PSI 0.31 on rsi_14"' in rows[1]["detail"]


def test_celery_app_guarantees_and_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trainer.worker import celery_app

    conf = celery_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert {"trainer.train_model", "trainer.auto_retrain", "trainer.full_retrain"} <= set(celery_app.tasks)
    auto = conf.beat_schedule["trainer-auto-retrain"]
    assert auto["task"] == "trainer.auto_retrain" and auto["schedule"] == 6 * 3600
    weekly = conf.beat_schedule["trainer-full-retrain"]["schedule"]
    assert weekly.hour == {2} and weekly.minute == {0} and weekly.day_of_week == {0}  # Sunday 02:00 UTC
    assert conf.broker_transport_options["visibility_timeout"] > 2 * 3600
