"""Outcomes and live performance on the predictor: predictions served by the real app settle (the trainer's
settlement task) once the bars past their horizon are ingested; POST /v1/outcomes; GET /v1/performance figures
hand-checked on planted rows; the live-performance gauges on /metrics."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from services.predictor.performance import brier_score, log_loss, wilson_interval
from services.predictor.service import Predictor
from services.trainer.settings import TrainerSettings
from services.trainer.settlement import run_settlement
from shared.bars import bars_to_rows
from shared.storage import ObjectStore
from shared.timeframes import OHLCV
from tests.predictor.model_factory import FEATURES, register, write_model
from tests.support.keys import API_KEYS, READ_KEY, WRITE_KEY

ASYNC = pytest.mark.asyncio(loop_scope="session")

WRITE = {"X-API-Key": WRITE_KEY}
ATR = FEATURES.index("atr_14_pct")
H, DEAD_BAND, COST = 5, 0.5, 2.0e-4  # model_factory's label rule; TRAINER_OUTCOME_COST_BPS 2.0
LIVE = "PERFLIVE"
PLANTED = "PERFPLANT"
K = 2000  # bars stored when the predictions are made


def _predictor(app: FastAPI) -> Predictor:
    p = app.state.predictor
    assert isinstance(p, Predictor)
    return p


async def _ingest(indicators_url: str, symbol: str, bars: OHLCV) -> None:
    async with httpx.AsyncClient(base_url=indicators_url, headers=WRITE, timeout=60) as ind:
        r = await ind.post(f"/v1/bars/{symbol}/H1", json={"bars": bars_to_rows(bars)})
        assert r.status_code == 200, r.text


def _settle(database_url: str, store_url: str, symbol: str) -> dict[str, Any]:
    settings = TrainerSettings(
        database_url=database_url, model_store_url=store_url, api_keys=API_KEYS, environment="test"
    )
    return run_settlement(settings=settings, symbols={symbol})


async def _outcomes(database_url: str, symbol: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT model_version, variant, prediction_id, signal, realised_log_return, realised_label, hit, pnl "
            "FROM bar_outcomes WHERE symbol = $1 ORDER BY bar_ts",
            symbol,
        )
    finally:
        await conn.close()
    return rows


@ASYNC
async def test_served_predictions_settle_once_per_bar_when_the_horizon_bars_arrive(
    app: FastAPI,
    client: httpx.AsyncClient,
    database_url: str,
    store: ObjectStore,
    store_url: str,
    indicators_url: str,
    hourly_bars: OHLCV,
    scaler: tuple[list[float], list[float]],
) -> None:
    mean, scale = scaler
    sha = write_model(store, LIVE, "H1", "live-v1", seed=4, mean=mean, scale=scale)
    await register(database_url, store, LIVE, "H1", "live-v1", sha)
    await _ingest(indicators_url, LIVE, hourly_bars.window(0, K))
    predictor = _predictor(app)
    deadline = time.monotonic() + 15
    while predictor.models.get(LIVE, "H1") is None:
        assert time.monotonic() < deadline, "the predictor did not load the new model"
        await asyncio.sleep(0.2)

    # Five requests for the same bar (the first computes, the others come from the cache).
    answers = []
    # The indicators service may still be cold (first features call of the run on a shared 2-core box: 503).
    for _ in range(10):
        r = await client.post("/v1/predictions", json={"symbol": LIVE, "timeframe": "H1"})
        if r.status_code != 503:
            break
        await asyncio.sleep(1.0)
    assert r.status_code == 200, r.text
    answers.append(r.json())
    for _ in range(4):
        r = await client.post("/v1/predictions", json={"symbol": LIVE, "timeframe": "H1"})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert len({a["bar_ts"] for a in answers}) == 1
    assert datetime.fromisoformat(answers[0]["bar_ts"]).timestamp() == hourly_bars.ts[K - 1]
    assert len({a["prediction_id"] for a in answers}) == 5
    await predictor.log.flush()

    assert (await asyncio.to_thread(_settle, database_url, store_url, LIVE))["settled"] == 0
    await _ingest(indicators_url, LIVE, hourly_bars.window(K, K + H - 1))
    assert (await asyncio.to_thread(_settle, database_url, store_url, LIVE))["settled"] == 0
    await _ingest(indicators_url, LIVE, hourly_bars.window(K + H - 1, K + H))
    assert (await asyncio.to_thread(_settle, database_url, store_url, LIVE))["settled"] == 1
    assert (await asyncio.to_thread(_settle, database_url, store_url, LIVE))["settled"] == 0

    (row,) = await _outcomes(database_url, LIVE)
    first = answers[0]
    assert (row["model_version"], row["variant"], str(row["prediction_id"])) == (
        "live-v1",
        "production",
        first["prediction_id"],
    )
    # By hand from the bars and the logged window (the model's own rule: dead band 0.5 x ATR(14)/close at t).
    record = (await client.get(f"/v1/predictions/{first['prediction_id']}")).json()
    atr_pct = record["features"][-1][ATR]
    t = K - 1
    c, o = hourly_bars.close, hourly_bars.open
    ret = math.log(c[t + H] / c[t])
    label = "BUY" if ret > DEAD_BAND * atr_pct else "SELL" if ret < -DEAD_BAND * atr_pct else "HOLD"
    direction = {"BUY": 1, "SELL": -1, "HOLD": 0}[first["signal"]]
    pnl = direction * math.log(c[t + H] / o[t + 1]) - (COST if direction else 0.0)
    assert row["realised_log_return"] == pytest.approx(ret, abs=1e-9)
    assert (row["signal"], row["realised_label"], row["hit"]) == (first["signal"], label, first["signal"] == label)
    assert row["pnl"] == pytest.approx(pnl, abs=1e-9)

    perf = (await client.get("/v1/performance", params={"symbol": LIVE, "timeframe": "H1"})).json()
    (v,) = perf["versions"]
    assert (v["model_version"], v["variant"], v["predictions"], v["settled_bars"]) == ("live-v1", "production", 5, 1)
    assert v["hits"] == int(row["hit"])
    assert v["return_after_costs"] == pytest.approx(pnl, abs=1e-9)


# --- planted rows ---------------------------------------------------------------------------------------------

BAR0 = datetime(2021, 2, 1, tzinfo=UTC)
# (probabilities SELL/HOLD/BUY, realised label, pnl); confidences exact in float32's neighbourhood of the bucket.
PLANTED_V1 = [
    ([0.05, 0.2, 0.75], "BUY", 0.01),  # BUY 0.75, right
    ([0.5, 0.3, 0.2], "BUY", -0.004),  # SELL 0.5, wrong
    ([0.2, 0.45, 0.35], "HOLD", 0.0),  # HOLD 0.45, right, no position
    ([0.025, 0.025, 0.95], "SELL", -0.002),  # BUY 0.95, wrong
]


async def _plant(database_url: str, store: ObjectStore) -> list[uuid.UUID]:
    """perf-v1 (production): 6 logged predictions, 4 settled bars; perf-v2 (candidate), in shadow: 2 logged and
    1 settled."""
    await register(database_url, store, PLANTED, "H1", "perf-v1", write_model(store, PLANTED, "H1", "perf-v1"))
    await register(
        database_url, store, PLANTED, "H1", "perf-v2", write_model(store, PLANTED, "H1", "perf-v2"), status="candidate"
    )
    conn = await asyncpg.connect(database_url)
    ids: list[uuid.UUID] = []
    try:
        await conn.execute(
            "INSERT INTO prediction_windows (window_hash, created_at, features, feature_shape) "
            "VALUES ('perf-window', now(), '{0}', '{1,1}') ON CONFLICT DO NOTHING"
        )
        for k, (version, variant) in enumerate([("perf-v1", "production")] * 6 + [("perf-v2", "shadow")] * 2):
            pid = uuid.uuid4()
            ids.append(pid)
            bar = BAR0 + timedelta(hours=k % 4 if variant == "production" else 0)
            await conn.execute(
                "INSERT INTO predictions (id, created_at, symbol, timeframe, bar_ts, model_version, variant, "
                "window_hash, probabilities, signal, confidence, consensus_signal, cached) "
                "VALUES ($1, $2, $3, 'H1', $4, $5, $6, 'perf-window', '{0.2,0.3,0.5}', 'BUY', 0.5, 'BUY', false)",
                pid,
                bar + timedelta(hours=1, seconds=k),
                PLANTED,
                bar,
                version,
                variant,
            )
        rows = [("perf-v1", "production", k, *spec) for k, spec in enumerate(PLANTED_V1)]
        rows.append(("perf-v2", "shadow", 0, [0.1, 0.1, 0.8], "BUY", 0.003))
        for n, (version, variant, k, probs, realised, pnl) in enumerate(rows):
            signal = ("SELL", "HOLD", "BUY")[int(np.argmax(probs))]
            await conn.execute(
                "INSERT INTO bar_outcomes (symbol, timeframe, model_version, variant, bar_ts, prediction_id, "
                "probabilities, signal, confidence, horizon, realised_log_return, realised_label, hit, pnl) "
                "VALUES ($1, 'H1', $2, $3, $4, $5, $6, $7, $8, 5, 0.0, $9, $10, $11)",
                PLANTED,
                version,
                variant,
                BAR0 + timedelta(hours=k),
                ids[n] if variant == "production" else ids[6],
                probs,
                signal,
                max(probs),
                realised,
                signal == realised,
                pnl,
            )
    finally:
        await conn.close()
    return ids


@pytest.fixture(scope="module")
async def planted(database_url: str, store: ObjectStore, models: dict[str, str]) -> list[uuid.UUID]:
    return await _plant(database_url, store)


@ASYNC
async def test_post_outcome_201_200_404_409_422_and_audit(
    client: httpx.AsyncClient, database_url: str, planted: list[uuid.UUID]
) -> None:
    pid = str(planted[0])
    body = {"prediction_id": pid, "pnl": 0.003, "detail": {"trade_id": "T-1"}}
    first = await client.post("/v1/outcomes", json=body, headers=WRITE)
    assert first.status_code == 201, first.text
    stored = first.json()
    assert (stored["prediction_id"], stored["pnl"], stored["detail"], stored["recorded_by"]) == (
        pid,
        0.003,
        {"trade_id": "T-1"},
        "writer",
    )
    assert (stored["symbol"], stored["model_version"], stored["variant"]) == (PLANTED, "perf-v1", "production")
    again = await client.post("/v1/outcomes", json=body, headers=WRITE)
    assert again.status_code == 200 and again.json() == stored
    other = await client.post("/v1/outcomes", json={**body, "pnl": 0.004}, headers=WRITE)
    assert other.status_code == 409 and "already recorded" in other.json()["detail"]
    unknown = await client.post("/v1/outcomes", json={**body, "prediction_id": str(uuid.uuid4())}, headers=WRITE)
    assert unknown.status_code == 404 and "no prediction" in unknown.json()["detail"]
    bad_id = await client.post("/v1/outcomes", json={**body, "prediction_id": "nope"}, headers=WRITE)
    assert bad_id.status_code == 422
    nan = await client.post(
        "/v1/outcomes",
        content=f'{{"prediction_id": "{planted[1]}", "pnl": NaN}}',
        headers={**WRITE, "Content-Type": "application/json"},
    )
    assert nan.status_code == 422
    read_only = await client.post("/v1/outcomes", json=body, headers={"X-API-Key": READ_KEY})
    assert read_only.status_code == 403

    conn = await asyncpg.connect(database_url)
    try:
        audit = await conn.fetch(
            "SELECT actor, action, symbol, timeframe, after FROM audit_log WHERE target = $1", f"prediction:{pid}"
        )
        n = await conn.fetchval("SELECT count(*) FROM external_outcomes WHERE prediction_id = $1::uuid", pid)
    finally:
        await conn.close()
    assert n == 1
    assert [(a["actor"], a["action"], a["symbol"], a["timeframe"]) for a in audit] == [
        ("writer", "outcome.record", PLANTED, "H1")
    ]


@ASYNC
async def test_performance_figures_by_hand(client: httpx.AsyncClient, planted: list[uuid.UUID]) -> None:
    r = await client.get("/v1/performance", params={"symbol": PLANTED, "timeframe": "H1"})
    assert r.status_code == 200, r.text
    v1, v2 = r.json()["versions"]
    assert (v1["model_version"], v1["variant"], v1["predictions"], v1["settled_bars"]) == (
        "perf-v1",
        "production",
        6,
        4,
    )
    assert (v2["model_version"], v2["variant"], v2["predictions"], v2["settled_bars"]) == ("perf-v2", "shadow", 2, 1)
    assert v1["hits"] == 2 and v1["hit_rate"] == 0.5
    from scipy.stats import binomtest

    ci = binomtest(2, 4).proportion_ci(confidence_level=0.95, method="wilson")
    assert (v1["hit_rate_ci_low"], v1["hit_rate_ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    # Brier: 0.105 + 0.98 + 0.465 + 1.85375 over 4 bars; log loss: -mean ln p(realised).
    assert v1["brier"] == pytest.approx(3.40375 / 4, abs=1e-6)
    assert v1["log_loss"] == pytest.approx(
        -(math.log(0.75) + math.log(0.2) + math.log(0.45) + math.log(0.025)) / 4, abs=1e-6
    )
    buckets = {(b["confidence_low"], b["confidence_high"]): b for b in v1["calibration"]}
    assert [b["bars"] for b in v1["calibration"]] == [0, 1, 1, 0, 1, 0, 1]
    assert buckets[(0.4, 0.5)]["hit_rate"] == 1.0 and buckets[(0.5, 0.6)]["hit_rate"] == 0.0
    assert buckets[(0.7, 0.8)]["hit_rate"] == 1.0 and buckets[(0.9, 1.0)]["hit_rate"] == 0.0
    assert buckets[(0.9, 1.0)]["mean_confidence"] == pytest.approx(0.95, abs=1e-6)
    assert v1["calibration"][0]["confidence_low"] == pytest.approx(1 / 3, abs=1e-6)
    # Three trades (HOLD is none): wins 0.01, losses 0.004 + 0.002.
    assert v1["trades"] == 3
    assert v1["profit_factor"] == pytest.approx(0.01 / 0.006)
    assert v1["return_after_costs"] == pytest.approx(0.004)
    assert v2["hit_rate"] == 1.0 and v2["profit_factor"] is None and v2["return_after_costs"] == pytest.approx(0.003)
    # The outcome recorded above (the first planted perf-v1 prediction) is counted with its version.
    assert (v1["external_outcomes"], v1["external_pnl"]) == (1, pytest.approx(0.003))
    assert (v2["external_outcomes"], v2["external_pnl"]) == (0, None)

    since = (BAR0 + timedelta(hours=2)).isoformat()
    later = (await client.get("/v1/performance", params={"symbol": PLANTED, "timeframe": "H1", "since": since})).json()
    assert [(v["model_version"], v["settled_bars"], v["hits"]) for v in later["versions"]] == [("perf-v1", 2, 1)]


@ASYNC
async def test_cli_tables_show_the_api_figures(client: httpx.AsyncClient, planted: list[uuid.UUID]) -> None:
    from rich.console import Console

    from services.predictor.cli import render_performance

    body = (await client.get("/v1/performance", params={"symbol": PLANTED, "timeframe": "H1"})).json()
    console = Console(width=250, record=True)
    for table in render_performance(body):
        console.print(table)
    text = console.export_text()
    assert "perf-v1" in text and "shadow" in text
    assert "50.0% (15.0%-85.0%)" in text  # hit rate 2/4 and its Wilson interval
    assert "calibration of perf-v1 (production)" in text and "0.90-1.00" in text


@ASYNC
async def test_performance_of_an_unknown_series_is_404(client: httpx.AsyncClient, models: dict[str, str]) -> None:
    r = await client.get("/v1/performance", params={"symbol": "NOSUCH", "timeframe": "H1"})
    assert r.status_code == 404 and "NOSUCH H1" in r.json()["detail"]
    bad = await client.get("/v1/performance", params={"symbol": "NOSUCH", "timeframe": "H7"})
    assert bad.status_code == 422


@ASYNC
async def test_gauges_on_metrics(app: FastAPI, client: httpx.AsyncClient, planted: list[uuid.UUID]) -> None:
    gauges = app.state.performance_gauges
    assert gauges.refreshed >= 1  # the background loop ran at start (then every PERFORMANCE_REFRESH_SECONDS)
    await gauges.refresh()  # now, rather than waiting for its next round
    text = (await client.get("/metrics")).text
    assert 'ml_model_accuracy{model_version="perf-v1"} 0.5' in text
    assert 'ml_model_accuracy{model_version="perf-v2"} 1.0' in text
    assert 'ml_model_settled_bars{model_version="perf-v1",variant="production"} 4.0' in text
    assert 'ml_model_settled_bars{model_version="perf-v2",variant="shadow"} 1.0' in text

    def value(prefix: str) -> float:
        return float(next(x for x in text.splitlines() if x.startswith(prefix)).split()[-1])

    assert value('ml_model_pnl{model_version="perf-v1"}') == pytest.approx(0.004)
    assert value('ml_model_brier{model_version="perf-v1"}') == pytest.approx(3.40375 / 4, abs=1e-6)


def test_statistics_match_scipy_and_scikit_learn() -> None:
    from scipy.stats import binomtest
    from sklearn.metrics import brier_score_loss
    from sklearn.metrics import log_loss as sk_log_loss

    for hits, n in ((0, 10), (3, 10), (10, 10), (57, 100), (1, 1), (480, 1000)):
        ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(hits, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    rng = np.random.default_rng(3)
    p = rng.dirichlet([1, 1, 1], 200)
    y = rng.integers(0, 3, 200)
    realised = [("SELL", "HOLD", "BUY")[k] for k in y]
    assert brier_score(p, realised) == pytest.approx(brier_score_loss(y, p, labels=[0, 1, 2]), abs=1e-12)
    assert log_loss(p, realised) == pytest.approx(sk_log_loss(y, p, labels=[0, 1, 2]), abs=1e-12)
