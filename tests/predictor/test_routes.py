"""The prediction API against a real PostgreSQL, Redis and indicators service."""

from __future__ import annotations

import asyncio
import math
from typing import cast

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from services.predictor.service import WARMUP_BARS, Predictor
from shared.bars import bars_to_rows
from shared.model_metadata import CLASSES
from shared.timeframes import OHLCV
from shared.warmup import WARMUP_BARS as SHARED_WARMUP
from tests.support.keys import READ_KEY
from tests.support.predictor import SHORT, SYMBOL, SYMBOL2

NO_CACHE = {"Cache-Control": "no-cache"}


def test_warmup_matches_the_feature_definitions() -> None:
    assert WARMUP_BARS == SHARED_WARMUP


async def test_prediction_from_stored_bars(client: httpx.AsyncClient, hourly_bars: OHLCV) -> None:
    r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["symbol"] == SYMBOL and body["timeframe"] == "H1"
    assert body["signal"] in CLASSES
    assert body["model_version"] == "v1" and body["variant"] == "production"
    probs = body["probabilities"]
    assert set(probs) == {"BUY", "SELL", "HOLD"}
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)
    assert body["confidence"] == max(probs.values())
    assert probs[body["signal"]] == body["confidence"]
    assert body["cached"] is False
    assert body["timeframes"]["H1"]["signal"] == body["signal"]
    assert body["consensus"]["signal"] == body["signal"]  # one timeframe: the consensus is its signal
    assert -1.0 <= body["indicator_score"] <= 1.0
    assert body["weights_version"] == "equal-v1"
    newest = bars_to_rows(hourly_bars.tail(1))[0]
    assert body["bar_ts"] == newest["ts"]
    assert body["risk"]["entry_price"] == newest["close"]
    risk = body["risk"]
    if body["signal"] == "HOLD":
        assert risk["position_fraction"] == 0
    else:
        assert 0 < risk["position_fraction"] <= risk["max_position_fraction"]
        entry = risk["entry_price"]
        if body["signal"] == "BUY":
            assert risk["stop_loss"] < entry < risk["take_profit"]
        else:
            assert risk["take_profit"] < entry < risk["stop_loss"]


async def test_prediction_equals_onnx_on_the_indicator_window(
    client: httpx.AsyncClient, app: FastAPI, indicators_url: str
) -> None:
    """The served probabilities are the model's on the indicators service's newest 20 rows, calibrated."""
    r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers=NO_CACHE)
    body = r.json()
    async with httpx.AsyncClient(base_url=indicators_url, headers={"X-API-Key": READ_KEY}) as ind:
        rows = (await ind.get(f"/v1/indicators/{SYMBOL}/H1", params={"limit": 20})).json()["timeframes"]["H1"]
    predictor: Predictor = app.state.predictor
    model = predictor.models.get(SYMBOL, "H1")
    assert model is not None
    window = np.array([[row["values"][n] for n in model.feature_names] for row in rows], dtype=np.float64)
    x = ((window - np.array(model.metadata.scaler.mean)) / np.array(model.metadata.scaler.scale))[None].astype(
        np.float32
    )
    raw = model.session.run(None, {"features": x})[0][0].astype(np.float64)
    logits = np.log(raw) / model.metadata.calibration.temperature
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    for i, c in enumerate(CLASSES):
        assert body["probabilities"][c] == pytest.approx(expected[i], abs=1e-5)
    assert body["bar_ts"] == rows[-1]["ts"]


async def test_second_identical_request_is_cached(client: httpx.AsyncClient) -> None:
    first = (await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers=NO_CACHE)).json()
    second = (await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})).json()
    assert first["cached"] is False
    assert second["cached"] is True
    assert second["prediction_id"] != first["prediction_id"]
    for field in ("signal", "confidence", "probabilities", "model_version", "bar_ts", "risk"):
        assert second[field] == first[field]


async def test_signal_endpoint_returns_the_latest_signal(client: httpx.AsyncClient) -> None:
    fresh = (await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers=NO_CACHE)).json()
    r = await client.get(f"/v1/signals/{SYMBOL}/H1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cached"] is True
    assert body["signal"] == fresh["signal"] and body["bar_ts"] == fresh["bar_ts"]


async def test_concurrent_identical_misses_are_computed_once() -> None:
    from services.predictor.cache import PredictionCache

    cache = PredictionCache(None, 1.0)
    release = asyncio.Event()
    runs = 0

    async def compute() -> str:
        nonlocal runs
        runs += 1
        await release.wait()
        return "result"

    waiters = [asyncio.create_task(cache.single_flight("k", compute)) for _ in range(8)]
    other = asyncio.create_task(cache.single_flight("other", compute))
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*waiters, other)
    assert runs == 2  # one per distinct key
    assert [r[0] for r in results] == ["result"] * 9
    assert sum(shared for _, shared in results) == 7


async def test_concurrent_identical_requests_all_succeed(client: httpx.AsyncClient) -> None:
    replies = await asyncio.gather(
        *(
            client.post(
                "/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1", "timeframes": ["H4"]}, headers=NO_CACHE
            )
            for _ in range(8)
        )
    )
    assert all(r.status_code == 200 for r in replies)
    assert len({r.json()["prediction_id"] for r in replies}) == 8
    assert len({r.json()["confidence"] for r in replies}) == 1


async def test_multi_timeframe_consensus_and_missing_model(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1", "timeframes": ["H1", "H4", "D1"]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    tfs = body["timeframes"]
    assert set(tfs) == {"H1", "H4", "D1"}
    assert tfs["H1"]["status"] == "ok" and tfs["H4"]["status"] == "ok"
    assert tfs["H4"]["model_version"] == "v1"
    assert tfs["D1"]["status"] == "no_model" and tfs["D1"]["signal"] is None
    consensus = body["consensus"]
    assert consensus["timeframes_used"] == ["H1", "H4"]
    votes = consensus["votes"]
    expected = dict.fromkeys(CLASSES, 0.0)
    for tf in ("H1", "H4"):
        expected[tfs[tf]["signal"]] += tfs[tf]["confidence"]
    for c in CLASSES:
        assert votes[c] == pytest.approx(expected[c], abs=1e-5)
    ranked = sorted(expected.values(), reverse=True)
    if math.isclose(ranked[0], ranked[1]):
        assert consensus["signal"] == "HOLD"
    else:
        assert consensus["signal"] == max(expected, key=lambda c: expected[c])


async def test_prediction_from_sent_bars(client: httpx.AsyncClient, hourly_bars: OHLCV) -> None:
    bars = bars_to_rows(hourly_bars.tail(600))
    r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1", "bars": bars})
    assert r.status_code == 200, r.text
    stored = (await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})).json()
    # The same newest bars as stored, through the same feature code: the same prediction.
    assert r.json()["bar_ts"] == stored["bar_ts"]
    assert r.json()["probabilities"] == pytest.approx(stored["probabilities"], abs=1e-5)
    again = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1", "bars": bars})
    assert again.json()["cached"] is True


async def test_invalid_bar_is_named(client: httpx.AsyncClient, hourly_bars: OHLCV) -> None:
    bars = bars_to_rows(hourly_bars.tail(600))
    bars[17]["high"] = cast(float, bars[17]["close"]) * 0.5
    r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1", "bars": bars})
    assert r.status_code == 422
    assert "bar 17" in r.json()["detail"] and "high" in r.json()["detail"]


async def test_nan_in_bars_is_422_not_500(client: httpx.AsyncClient, hourly_bars: OHLCV) -> None:
    bars = bars_to_rows(hourly_bars.tail(600))
    body = httpx.Request("POST", "/", json={"symbol": SYMBOL, "timeframe": "H1", "bars": bars}).content
    body = body.replace(str(bars[3]["close"]).encode(), b"NaN", 1)
    r = await client.post("/v1/predictions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "bar 3" in r.json()["detail"]


async def test_too_few_sent_bars_says_how_many(client: httpx.AsyncClient, hourly_bars: OHLCV) -> None:
    r = await client.post(
        "/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1", "bars": bars_to_rows(hourly_bars.tail(300))}
    )
    assert r.status_code == 422
    assert "need at least 520" in r.json()["detail"]
    assert r.json()["error"] == "not_enough_bars"


async def test_too_few_stored_bars_says_how_many(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/predictions", json={"symbol": SHORT, "timeframe": "H1"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "need at least 520 H1 bars" in detail and "have 510" in detail
    assert r.json()["error"] == "not_enough_bars"


async def test_no_model_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/predictions", json={"symbol": SYMBOL2, "timeframe": "H1"})
    assert r.status_code == 404
    assert "no production model for PRED2 H1" in r.json()["detail"]
    r = await client.post("/v1/predictions", json={"symbol": "NOPE", "timeframe": "M5"})
    assert r.status_code == 404
    r = await client.get(f"/v1/signals/{SYMBOL}/D1")
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"timeframe": "H1"}, "symbol is required"),
        ({"symbol": SYMBOL, "timeframe": "H2"}, "unknown timeframe"),
        ({"symbol": "bad symbol", "timeframe": "H1"}, "bad symbol"),
        ({"symbol": SYMBOL, "timeframe": "H1", "timeframes": ["M5"]}, "cannot be built from H1"),
        ({"symbol": SYMBOL, "timeframe": "H1", "timeframes": "H4"}, "timeframes must be a list"),
        ({"symbol": SYMBOL, "timeframe": "H1", "bars": []}, "bars is empty"),
        ({"symbol": SYMBOL, "timeframe": "H1", "bars": [1, 2]}, "bar 0: must be an object"),
        ({"symbol": SYMBOL, "timeframe": "H1", "user_id": 5}, "user_id"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_requests_are_422(client: httpx.AsyncClient, body: object, fragment: str) -> None:
    r = await client.post("/v1/predictions", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


async def test_garbage_body_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/predictions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


async def test_keys_are_required(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as anon:
        r = await anon.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})
        assert r.status_code == 401
        assert (await anon.get("/weights")).status_code == 401
        r = await anon.get("/weights", headers={"X-API-Key": "wrong-key-wrong-key"})
        assert r.status_code == 401


async def test_weights(client: httpx.AsyncClient) -> None:
    r = await client.get("/weights")
    assert r.status_code == 200
    body = r.json()
    assert body["weights_version"] == "equal-v1" and body["source"] == "default"
    assert set(body["weights"].values()) == {1.0}
    r = await client.get("/v1/weights", params={"symbol": SYMBOL, "timeframe": "H1"})
    assert r.status_code == 200 and r.json()["symbol"] == SYMBOL
    assert (await client.get("/v1/weights", params={"timeframe": "X9"})).status_code == 422


async def test_readiness_reports_every_dependency(client: httpx.AsyncClient) -> None:
    r = await client.get("/health/ready")
    assert r.status_code == 200, r.text
    services = r.json()["services"]
    assert set(services) >= {"database", "cache", "model_storage", "indicators", "models_loaded"}
    assert all(s["status"] == "healthy" for s in services.values()), services


async def test_metrics_are_exposed(client: httpx.AsyncClient) -> None:
    await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})
    text = (await client.get("/metrics")).text
    for name in (
        "ml_prediction_requests_total",
        "ml_prediction_duration_seconds",
        "ml_active_models",
        "ml_prediction_cache_total",
        "ml_model_load_failures_total",
        "ml_prediction_log_dropped_total",
        "ml_model_accuracy",
    ):
        assert name in text, name
    assert 'ml_prediction_requests_total{result="ok",symbol="PRED1"}' in text
    assert 'ml_prediction_cache_total{result="hit"}' in text


async def test_openapi_documents_quality_weights_and_explanations(app: FastAPI) -> None:
    spec = app.openapi()
    schemas = spec["components"]["schemas"]
    quality = schemas["PredictionOut"]["properties"]["quality"]
    assert "verdict" in quality["description"] and "cached" in quality["description"]
    assert set(schemas["ModelQuality"]["properties"]["gate"]["enum"]) == {"passed", "failed", "not_validated"}
    assert {"id", "method", "data_start", "data_end", "importances", "correlation"} <= set(
        schemas["WeightsOut"]["properties"]
    )
    explanation = spec["paths"]["/v1/predictions/{prediction_id}/explanation"]["get"]["responses"]
    assert {"200", "202", "404", "409", "503"} <= set(explanation)
