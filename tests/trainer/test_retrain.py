"""Auto-retrain decisions (recorded with their reasons), a full retrain cycle, concurrent schedule runs,
and the Celery configuration (retries, sweeper, broker timeouts)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from services.trainer import repository as repo
from services.trainer.jobs import run_job
from services.trainer.retrain import decide_and_queue
from services.trainer.settings import TrainerSettings
from shared.timeframes import OHLCV, Timeframe
from tests.support.trainer import TINY, ingest, new_job

# Nothing but a flag makes a series due.
NEVER_DUE = TrainerSettings(trainer_max_model_age_hours=1e6, trainer_min_new_bars=10**6)


def _mine(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in decisions if d["symbol"] == "SPXTRAIN" and d["timeframe"] == "D1"]
    assert len(found) == 1
    return found[0]


async def test_auto_retrain_records_why_it_did_or_did_not_retrain(trained: dict[str, Any], database_url: str) -> None:
    settings = TrainerSettings(trainer_max_model_age_hours=24, trainer_min_new_bars=50)
    sent: list[str] = []
    conn = await asyncpg.connect(database_url)
    try:
        first = _mine(await decide_and_queue(conn, settings, "beat-1", full=False, send=sent.append))
        assert first == {
            "symbol": "SPXTRAIN",
            "timeframe": "D1",
            "retrain": False,
            "reasons": ["up_to_date"],
            "training_job_id": None,
        }

        # A later issue's drift monitor raises the flag; the next run retrains and says why.
        await repo.set_flags(conn, "SPXTRAIN", "D1", drift=True, performance=False, reason="PSI 0.31 on rsi_14")
        second = _mine(await decide_and_queue(conn, settings, "beat-2", full=False, send=sent.append))
        assert second["retrain"] is True and second["reasons"] == ["drift_flag"]
        assert second["training_job_id"] in sent  # sent right after its own row was committed
        job = await repo.get_job(conn, second["training_job_id"])
        assert job is not None and job.status == "queued" and job.params["lstm_units"] == [8, 8]

        # While that job is pending, neither schedule piles up another one.
        third = _mine(await decide_and_queue(conn, settings, "beat-3", full=False, send=sent.append))
        assert third["retrain"] is False and third["reasons"] == ["job_in_progress"]
        full = _mine(await decide_and_queue(conn, settings, "beat-4", full=True, send=sent.append))
        assert full["reasons"] == ["job_in_progress"]

        # An old model is retrained for its age alone.
        await repo.fail_job(conn, second["training_job_id"], "test: cancelled")
        await repo.clear_flags(conn, "SPXTRAIN", "D1")
        aged = TrainerSettings(trainer_max_model_age_hours=1e-6, trainer_min_new_bars=10**6)
        fourth = _mine(await decide_and_queue(conn, aged, "beat-5", full=False, send=sent.append))
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


async def _flags(database_url: str, symbol: str, timeframe: str) -> tuple[bool, bool] | None:
    conn = await asyncpg.connect(database_url)
    try:
        f = await repo.get_flags(conn, symbol, timeframe)
    finally:
        await conn.close()
    return (f.drift, f.performance) if f else None


async def test_a_retrain_awaiting_promotion_is_not_queued_again_and_keeps_the_flags(
    database_url: str, trainer_settings: TrainerSettings, sp500: OHLCV
) -> None:
    symbol = "CYCLETRAIN"
    await ingest(database_url, symbol, Timeframe.D1, sp500.tail(1200))
    settings = NEVER_DUE
    conn = await asyncpg.connect(database_url)
    try:
        # A flag left from before the first model: the first model becomes production and clears it.
        await repo.set_flags(conn, symbol, "D1", drift=True, performance=False, reason="stale")
        first = await new_job(database_url, symbol, "D1", TINY)
        r1 = await asyncio.to_thread(run_job, first, settings=trainer_settings)
        assert r1["status"] == "production"
        assert await _flags(database_url, symbol, "D1") == (False, False)

        # The lifecycle monitor flags the production model: the schedule retrains for it.
        await repo.set_flags(conn, symbol, "D1", drift=True, performance=True, reason="PSI 0.4 on rsi_14")
        sent: list[str] = []
        d1 = _one(await decide_and_queue(conn, settings, "cycle-1", full=False, send=sent.append), symbol)
        assert d1["retrain"] is True and d1["reasons"] == ["drift_flag", "performance_flag"]
        assert sent == [d1["training_job_id"]]

        # The retrain finishes: a candidate (nothing promotes it in this issue); production still serves,
        # so its flags stay.
        r2 = await asyncio.to_thread(run_job, d1["training_job_id"], settings=trainer_settings)
        assert r2["status"] == "candidate"
        assert await _flags(database_url, symbol, "D1") == (True, True)

        # Next runs: the candidate is the answer to the flags; no retrain is queued, and the reason is recorded.
        for source in ("cycle-2", "cycle-3"):
            d = _one(await decide_and_queue(conn, settings, source, full=False, send=sent.append), symbol)
            assert d["retrain"] is False and d["reasons"] == ["recently_retrained"]
        assert sent == [d1["training_job_id"]]
        assert await _flags(database_url, symbol, "D1") == (True, True)
        detail = await conn.fetchval(
            "SELECT detail FROM retrain_decisions WHERE source_job_id = 'cycle-3' AND symbol = $1", symbol
        )
        assert f'"basis_version": "{r2["version"]}"' in detail and '"basis_status": "candidate"' in detail
        assert '"flags_pending_promotion": ["drift_flag", "performance_flag"]' in detail

        # Age and new bars are measured from the candidate: once it is too old itself, retrain again.
        aged = TrainerSettings(trainer_max_model_age_hours=1e-6, trainer_min_new_bars=10**6)
        d4 = _one(await decide_and_queue(conn, aged, "cycle-4", full=False, send=sent.append), symbol)
        assert d4["retrain"] is True and d4["reasons"] == ["model_age"]
        await repo.fail_job(conn, d4["training_job_id"], "test: cancelled")
    finally:
        await _fail_queued(conn)
        await conn.close()


async def test_concurrent_schedule_runs_queue_one_job(database_url: str, sp500: OHLCV) -> None:
    # A flagged production model of a series of its own (W1, resampled from stored D1 bars); the registry
    # row is enough for the schedule, which reads no artifact.
    symbol, timeframe = "RACETRAIN", "W1"
    await ingest(database_url, symbol, Timeframe.D1, sp500.tail(1200))
    conn = await asyncpg.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        await repo.register_version(
            conn,
            symbol=symbol,
            timeframe=timeframe,
            version="20260101T000000Z-race",
            metrics={},
            artifact_uri="s3://unused/",
            sha256="0" * 64,
            training_job_id=None,
        )
        await repo.set_flags(conn, symbol, timeframe, drift=True, performance=False, reason="race")
        sent: list[str] = []
        settings = NEVER_DUE
        a, b = await asyncio.gather(
            decide_and_queue(conn, settings, "race-a", full=False, send=sent.append),
            decide_and_queue(other, settings, "race-b", full=False, send=sent.append),
        )
        da, db = _one(a, symbol, timeframe), _one(b, symbol, timeframe)
        assert sorted([da["retrain"], db["retrain"]]) == [False, True]
        loser = da if not da["retrain"] else db
        assert loser["reasons"] == ["job_in_progress"]
        jobs = await conn.fetch(
            "SELECT id FROM training_jobs WHERE symbol = $1 AND timeframe = $2 AND status IN ('queued', 'running')",
            symbol,
            timeframe,
        )
        assert len(jobs) == 1 and sent == [jobs[0]["id"]]
        assert jobs[0]["id"] in (da["training_job_id"], db["training_job_id"])
    finally:
        await _fail_queued(conn)
        await repo.set_flags(conn, symbol, timeframe, drift=False, performance=False, reason=None)
        await other.close()
        await conn.close()


def _one(decisions: list[dict[str, Any]], symbol: str, timeframe: str = "D1") -> dict[str, Any]:
    found = [d for d in decisions if d["symbol"] == symbol and d["timeframe"] == timeframe]
    assert len(found) == 1, decisions
    return found[0]


async def _fail_queued(conn: asyncpg.Connection) -> None:
    """Jobs these tests queued without a worker: fail them so no series stays blocked for later tests."""
    await conn.execute(
        "UPDATE training_jobs SET status = 'failed', error = 'test: cleanup' "
        "WHERE status IN ('queued', 'running') AND id IN (SELECT training_job_id FROM retrain_decisions "
        "WHERE training_job_id IS NOT NULL)"
    )


def test_db_unavailable_retries_back_off_and_are_bounded() -> None:
    from services.trainer.tasks import db_retry_delay

    t = TrainerSettings(trainer_db_retry_max=8, trainer_db_retry_base_seconds=5, trainer_db_retry_max_delay_seconds=300)
    assert [db_retry_delay(n, t) for n in range(9)] == [5, 10, 20, 40, 80, 160, 300, 300, None]


def test_train_task_retries_while_postgresql_is_unreachable_then_leaves_the_job_to_the_sweeper(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    from services.trainer.settings import get_trainer_settings
    from services.trainer.tasks import train_model

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/nowhere")
    monkeypatch.setenv("TRAINER_DB_RETRY_MAX", "3")
    get_trainer_settings.cache_clear()
    try:
        # Eager apply runs each Celery retry at once (countdowns skipped): the raw connection error never
        # escapes, each retry is counted, and the last one gives up without failing the job it cannot reach.
        with caplog.at_level("WARNING", logger="trainer.tasks"):
            result = train_model.apply(args=["0" * 32])
    finally:
        get_trainer_settings.cache_clear()
    assert result.successful(), result.traceback
    assert result.get()["status"] == "database_unavailable"
    assert "cannot reach PostgreSQL" in result.get()["error"]
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert [m.split("retry ")[1].split(" in ")[0] for m in retries if " of " in m] == ["1 of 3", "2 of 3", "3 of 3"]
    assert any("the sweeper will re-send the job" in r.getMessage() for r in caplog.records)


def test_celery_app_guarantees_and_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trainer.celery_app import celery_app

    celery_app.loader.import_default_modules()  # what a starting worker does: loads `include`
    conf = celery_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert {
        "trainer.train_model",
        "trainer.validate_model",
        "trainer.backtest",
        "trainer.optimize_weights",
        "trainer.explain_prediction",
        "trainer.auto_retrain",
        "trainer.full_retrain",
    } <= set(celery_app.tasks)
    auto = conf.beat_schedule["trainer-auto-retrain"]
    assert auto["task"] == "trainer.auto_retrain" and auto["schedule"] == 6 * 3600
    weekly = conf.beat_schedule["trainer-full-retrain"]["schedule"]
    assert weekly.hour == {2} and weekly.minute == {0} and weekly.day_of_week == {0}  # Sunday 02:00 UTC
    assert conf.broker_transport_options["visibility_timeout"] > 2 * 3600
    # A broker that accepts and never answers cannot hold a publish: socket timeouts and a short retry policy.
    assert conf.broker_transport_options["socket_timeout"] == conf.broker_transport_options["socket_connect_timeout"]
    assert 0 < conf.broker_transport_options["socket_timeout"] <= 10
    assert conf.task_publish_retry_policy["max_retries"] <= 2
    sweep = conf.beat_schedule["trainer-sweep-jobs"]
    assert sweep["task"] == "trainer.sweep_jobs" and sweep["schedule"] == 300
    assert "trainer.sweep_jobs" in celery_app.tasks


def test_amqp_broker_gets_read_write_and_connect_timeouts() -> None:
    from services.trainer.celery_app import create_celery

    app = create_celery(
        TrainerSettings(celery_broker_url="amqp://guest:guest@127.0.0.1:5672//", trainer_broker_timeout_seconds=2.5),
    )
    opts = app.conf.broker_transport_options
    assert opts == {"read_timeout": 2.5, "write_timeout": 2.5}
    assert app.conf.broker_connection_timeout == 2.5
