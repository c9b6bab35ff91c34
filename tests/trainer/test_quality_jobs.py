"""The quality jobs end to end against real PostgreSQL and the S3 server: validate (report stored, verdict on the
version, promotion), backtest (model and uploaded signals), SHAP weights, explanations, and the API that serves
them. The walk-forward statistics themselves are tested in test_validation.py, the gate rule in test_gate.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import numpy as np
import pytest

from services.trainer import repository as repo
from services.trainer.jobs import run_job
from services.trainer.main import create_app
from services.trainer.quality_jobs import run_explanation
from services.trainer.schemas import ModelVersion
from services.trainer.settings import TrainerSettings
from shared.features import FEATURE_NAMES, compute_features
from shared.timeframes import OHLCV, Timeframe
from tests.support.clients import asgi_client
from tests.support.trainer import TINY, ingest, new_job

pytestmark = pytest.mark.slow

SYMBOL = "SPXQ"
FOLDS = 3


async def _create(database_url: str, kind: str, params: dict[str, Any], symbol: str = SYMBOL) -> str:
    job_id = uuid.uuid4().hex
    conn = await asyncpg.connect(database_url)
    try:
        await repo.create_job(conn, job_id, kind, symbol, "D1", params)
    finally:
        await conn.close()
    return job_id


async def _run(settings: TrainerSettings, job_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(run_job, job_id, settings=settings, retry=False)


async def _versions(database_url: str) -> list[ModelVersion]:
    conn = await asyncpg.connect(database_url)
    try:
        return await repo.list_versions(conn, SYMBOL, "D1")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def first(trainer_settings: TrainerSettings, database_url: str, sp500: OHLCV) -> ModelVersion:
    """The series' first model (production, not validated yet)."""
    await ingest(database_url, SYMBOL, Timeframe.D1, sp500)
    job_id = await new_job(database_url, SYMBOL, "D1", TINY)
    result = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)
    assert result["status"] == "production", result
    (v,) = await _versions(database_url)
    return v


@pytest.fixture(scope="module")
async def validated(trainer_settings: TrainerSettings, first: ModelVersion) -> dict[str, Any]:
    job_id = await _create(
        trainer_settings.database_url or "", "validate", {"folds": FOLDS, "model_version": first.version}
    )
    return await _run(trainer_settings, job_id)


@pytest.fixture(scope="module")
async def client(trainer_settings: TrainerSettings) -> AsyncIterator[httpx.AsyncClient]:
    async for c in asgi_client(
        create_app(trainer_settings.model_copy(update={"trainer_queue": f"quality-{uuid.uuid4().hex[:8]}"}))
    ):
        yield c


async def test_first_model_serves_as_not_validated_until_its_validation(
    first: ModelVersion, client: httpx.AsyncClient
) -> None:
    assert first.quality.gate == "not_validated"
    assert first.quality.validation_id is None
    r = await client.get(f"/v1/models/{first.id}/validation")
    assert r.status_code in (200, 404)  # 200 once the module's validation fixture has run


async def test_validation_stores_a_report_and_a_verdict_on_the_version(
    validated: dict[str, Any], first: ModelVersion, client: httpx.AsyncClient, database_url: str
) -> None:
    assert validated["gate"] in ("passed", "failed")
    assert validated["reasons"], "a verdict always says why"
    (v,) = [x for x in await _versions(database_url) if x.id == first.id]
    assert v.quality.gate == validated["gate"]
    assert v.quality.validation_id == validated["validation_id"]
    assert v.quality.reasons == validated["reasons"]
    assert v.status == "production"  # the first model serves either way; its verdict tells clients what it is

    r = await client.get(f"/v1/models/{first.id}/validation")
    assert r.status_code == 200, r.text
    body = r.json()
    report = body["report"]
    assert body["id"] == validated["validation_id"] and body["folds"] == FOLDS
    assert len(report["folds"]) == FOLDS
    assert {"lstm", "majority", "prior", "logistic_regression", "gradient_boosting"} <= set(report["models"])
    assert report["gate"]["gate"] == validated["gate"]
    # data range named, fold tests in order and after their training windows
    assert report["data_start"] < report["data_end"]
    tests = [f["test"] for f in report["folds"]]
    assert all(a["end"] < b["start"] for a, b in zip(tests, tests[1:], strict=False))
    assert all(f["fit"]["end"] < f["test"]["start"] for f in report["folds"])

    r = await client.get(f"/v1/models/{first.id}")
    assert r.status_code == 200
    detail = r.json()
    assert detail["quality"]["gate"] == validated["gate"]
    targets = {t["name"]: t for t in detail["business_targets"]}
    assert len(targets) == 5
    by_metric = {t["metric"]: t for t in report["business_targets"]}
    for t in detail["business_targets"]:
        assert t == {**by_metric[t["metric"]], "metric": t["metric"]}
        if t["value"] is not None:
            assert t["passed"] == (
                t["value"] > t["threshold"] if t["comparison"] == ">" else t["value"] < t["threshold"]
            )
    lstm_acc = report["models"]["lstm"]["pooled"]["metrics"]["accuracy"]
    assert next(t for t in detail["business_targets"] if t["metric"] == "accuracy")["value"] == pytest.approx(lstm_acc)


async def test_a_candidate_is_promoted_only_when_the_gate_passes(
    validated: dict[str, Any], first: ModelVersion, trainer_settings: TrainerSettings, database_url: str
) -> None:
    # Rollout policy direct: a passing candidate replaces production at once (canary and manual, which make it
    # the rollout's candidate instead, are tested in test_lifecycle.py).
    from services.trainer import lifecycle

    conn = await asyncpg.connect(database_url)
    try:
        await lifecycle.update_rollout(
            conn, SYMBOL, "D1", {"policy": "direct"}, actor="test", settings=trainer_settings
        )
    finally:
        await conn.close()
    # A second model of the series is a candidate; its validation compares it with production on the same folds.
    job_id = await new_job(database_url, SYMBOL, "D1", {**TINY, "seed": 7})
    trained = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)
    assert trained["status"] == "candidate"
    result = await _run(
        trainer_settings, await _create(database_url, "validate", {"folds": FOLDS, "model_version": trained["version"]})
    )
    versions = {v.version: v for v in await _versions(database_url)}
    cand, prod = versions[trained["version"]], versions[first.version]
    conn = await asyncpg.connect(database_url)
    try:
        stored = await repo.get_validation(conn, result["validation_id"])
    finally:
        await conn.close()
    assert stored is not None
    assert stored["report"]["compare_config"] is not None  # production's recipe retrained on the same folds
    assert "production" in stored["report"]["models"]
    assert cand.quality.gate == result["gate"]
    if result["gate"] == "passed":
        assert result["promoted"] and cand.status == "production" and prod.status == "archived"
        assert result["rollout"] == "promoted"
    else:
        assert not result["promoted"] and cand.status == "candidate" and prod.status == "production"
        assert any("log loss" in r or "log_loss" in r for r in cand.quality.reasons), cand.quality.reasons
        assert "rollout" not in result  # a failing candidate is never placed in the rollout


async def test_backtest_of_the_model_trades_only_bars_it_never_trained_on(
    validated: dict[str, Any], trainer_settings: TrainerSettings, database_url: str, client: httpx.AsyncClient
) -> None:
    prod = next(v for v in await _versions(database_url) if v.status == "production")
    result = await _run(
        trainer_settings, await _create(database_url, "backtest", {"cost_bps": 2, "model_version": prod.version})
    )
    m = result["metrics"]
    for key in (
        "total_return",
        "cagr",
        "sharpe",
        "sortino",
        "max_drawdown",
        "win_rate",
        "trades",
        "exposure",
        "buy_and_hold_return",
        "profit_factor",
        "average_trade",
        "max_drawdown_duration_seconds",
    ):
        assert key in m
    assert result["params"]["signals"] == "model" and result["params"]["sizing"] == "risk"
    r = await client.get(f"/v1/backtests/{result['backtest_id']}")
    assert r.status_code == 200
    body = r.json()
    conn = await asyncpg.connect(database_url)
    try:
        job = await repo.get_job(conn, prod.training_job_id or "")
    finally:
        await conn.close()
    assert job is not None and job.result is not None
    from services.trainer.artifacts import fetch_verified
    from shared.storage import store_from_url

    store = store_from_url(trainer_settings.model_store_url, trainer_settings.s3_endpoint_url)
    meta, _ = fetch_verified(store, SYMBOL, "D1", prod.version, prod.sha256, ())
    test_start = datetime.fromisoformat(str(meta.splits["test"]["start"]).replace("Z", "+00:00"))
    assert datetime.fromisoformat(body["data_start"]) >= test_start
    assert len(body["equity"]["equity"]) >= 2


async def test_uploaded_all_hold_signals_make_no_trade_and_no_return(
    first: ModelVersion, trainer_settings: TrainerSettings, database_url: str, sp500: OHLCV
) -> None:
    rows = "\n".join(f"{int(t)},HOLD" for t in sp500.ts[-300:])
    result = await _run(
        trainer_settings, await _create(database_url, "backtest", {"signals_csv": "ts,signal\n" + rows})
    )
    assert result["metrics"]["trades"] == 0
    assert result["metrics"]["total_return"] == 0


async def test_bad_backtest_and_validation_params_are_422_naming_what_is_wrong(
    first: ModelVersion, client: httpx.AsyncClient
) -> None:
    bad_csv = "ts,signal\n2018-12-27,BUY\n2018-12-28,BUYY\n"
    r = await client.post(
        "/v1/jobs", json={"kind": "backtest", "symbol": SYMBOL, "timeframe": "D1", "params": {"signals_csv": bad_csv}}
    )
    assert r.status_code == 422 and "line 3" in r.json()["detail"], r.text
    r = await client.post(
        "/v1/jobs", json={"kind": "backtest", "symbol": SYMBOL, "timeframe": "D1", "params": {"cost_bps": -1}}
    )
    assert r.status_code == 422 and "params.cost_bps" in r.json()["detail"], r.text
    r = await client.post(
        "/v1/jobs", json={"kind": "validate", "symbol": SYMBOL, "timeframe": "D1", "params": {"folds": 1}}
    )
    assert r.status_code == 422 and "params.folds" in r.json()["detail"], r.text
    r = await client.post("/v1/jobs", json={"kind": "validate", "symbol": "NOSUCH", "timeframe": "D1"})
    assert r.status_code == 404
    r = await client.get("/v1/models/999999/validation")
    assert r.status_code == 404


async def test_too_few_bars_for_the_folds_fails_the_validation_naming_the_bars_needed(
    trainer_settings: TrainerSettings, database_url: str, sp500: OHLCV, client: httpx.AsyncClient
) -> None:
    await ingest(database_url, "SPXSHORT", Timeframe.D1, sp500.window(0, 900))
    r = await client.post(
        "/v1/jobs", json={"kind": "validate", "symbol": "SPXSHORT", "timeframe": "D1", "params": {"folds": 5}}
    )
    assert r.status_code == 422, r.text
    assert "need at least" in r.json()["detail"] and "have 900" in r.json()["detail"]


async def test_weights_of_the_production_model_are_stored_and_plotted(
    validated: dict[str, Any], trainer_settings: TrainerSettings, database_url: str, client: httpx.AsyncClient
) -> None:
    result = await _run(trainer_settings, await _create(database_url, "optimize_weights", {}))
    conn = await asyncpg.connect(database_url)
    try:
        row = await repo.get_weights(conn, result["weights_id"])
    finally:
        await conn.close()
    assert row is not None
    w = row["weights"]
    assert set(w) == set(FEATURE_NAMES)
    assert all(v >= 0 for v in w.values()) and sum(w.values()) == pytest.approx(1.0, abs=1e-9)
    assert row["method"] and row["model_version_id"] is not None and row["version"].startswith("shap-")
    assert len(row["inputs"]["correlation"]) == 17 and set(row["inputs"]["importances"]) == set(FEATURE_NAMES)
    r = await client.get(f"/v1/weights/{row['id']}/plot.png")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert (await client.get("/v1/weights/999999/plot.png")).status_code == 404


async def _log_prediction(database_url: str, version: ModelVersion, sp500: OHLCV) -> str:
    """A prediction as the predictor logs it: the raw window of the newest 20 feature rows."""
    feats = compute_features(sp500)[-20:].astype(np.float32)
    pid = str(uuid.uuid4())
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO prediction_windows (window_hash, created_at, features, feature_shape) "
            "VALUES ($1, now(), $2, $3)",
            pid,
            feats.ravel().tolist(),
            list(feats.shape),
        )
        await conn.execute(
            "INSERT INTO predictions (id, created_at, symbol, timeframe, bar_ts, model_version, variant, window_hash, "
            "probabilities, signal, confidence, cached) VALUES ($1::uuid, now(), $2, 'D1', $3, $4, 'production', $5, "
            "$6, 'BUY', 0.5, false)",
            pid,
            SYMBOL,
            datetime.fromtimestamp(int(sp500.ts[-1]), UTC),
            version.version,
            pid,
            [0.2, 0.3, 0.5],
        )
    finally:
        await conn.close()
    return pid


async def test_an_explanation_is_queued_then_computed_with_the_top_contributions(
    validated: dict[str, Any],
    trainer_settings: TrainerSettings,
    database_url: str,
    sp500: OHLCV,
    client: httpx.AsyncClient,
) -> None:
    prod = next(v for v in await _versions(database_url) if v.status == "production")
    pid = await _log_prediction(database_url, prod, sp500)
    r = await client.post("/v1/explanations", json={"prediction_id": pid})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    again = await client.post("/v1/explanations", json={"prediction_id": pid})
    assert again.status_code == 202  # idempotent: still the one queued row
    out = await asyncio.to_thread(run_explanation, pid, settings=trainer_settings)
    assert out["status"] == "succeeded", out
    r = await client.get(f"/v1/explanations/{pid}")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "succeeded" and body["model_version"] == prod.version
    contrib = body["contributions"]
    assert 1 <= len(contrib) <= 10
    assert all(c["feature"] in FEATURE_NAMES and 0 <= c["step"] < 20 for c in contrib)
    mags = [abs(c["contribution"]) for c in contrib]
    assert mags == sorted(mags, reverse=True)
    feats = compute_features(sp500)[-20:].astype(np.float32)
    for c in contrib:  # values are the raw window's, step 0 = the newest bar
        assert c["value"] == pytest.approx(float(feats[19 - c["step"], FEATURE_NAMES.index(c["feature"])]), rel=1e-5)
    # unknown ids
    assert (await client.post("/v1/explanations", json={"prediction_id": str(uuid.uuid4())})).status_code == 404
    assert (await client.post("/v1/explanations", json={"prediction_id": "not-a-uuid"})).status_code == 422
    assert (await client.get(f"/v1/explanations/{uuid.uuid4()}")).status_code == 404


async def test_the_six_hourly_run_queues_validation_then_weights_for_a_production_model_lacking_them(
    trainer_settings: TrainerSettings, database_url: str, sp500: OHLCV
) -> None:
    from services.trainer.retrain import queue_stale_quality

    symbol = "SPXSTALE"
    await ingest(database_url, symbol, Timeframe.D1, sp500)
    job_id = await new_job(database_url, symbol, "D1", TINY)
    trained = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)
    sent: list[tuple[str, str]] = []
    conn = await asyncpg.connect(database_url)
    try:
        first = await queue_stale_quality(conn, trainer_settings, lambda k, j: sent.append((k, j)), symbol=symbol)
        assert [q["kind"] for q in first] == ["validate"] and sent == [("validate", first[0]["job_id"])]
        job = await repo.get_job(conn, first[0]["job_id"])
        assert job is not None and job.params["model_version"] == trained["version"]
        # the same run again while that job is active queues nothing more
        assert await queue_stale_quality(conn, trainer_settings, lambda k, j: sent.append((k, j)), symbol=symbol) == []
        # once validated (here: a verdict written as the validate job would), the missing weights are queued
        await repo.fail_job(conn, first[0]["job_id"], "test: done")
        version = await repo.find_version(conn, symbol, "D1", trained["version"])
        assert version is not None
        await repo.set_quality(conn, version.id, {"gate": "failed", "reasons": ["test"], "validation_id": None})
        second = await queue_stale_quality(conn, trainer_settings, lambda k, j: sent.append((k, j)), symbol=symbol)
        assert [q["kind"] for q in second] == ["optimize_weights"]
        await repo.fail_job(conn, second[0]["job_id"], "test: done")
    finally:
        await conn.close()
