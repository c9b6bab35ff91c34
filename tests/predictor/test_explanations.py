"""GET /v1/predictions/{id}/explanation: rows of prediction_explanations (the trainer's output contract) as
they are inserted by hand, and the first request asking the trainer (the real trainer API over
real HTTP) to compute one."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.predictor.deps import explanations_of, predictor_of
from services.predictor.explanations import Explanations
from services.predictor.prediction_log import PredictionLog
from services.predictor.trainer_client import TrainerClient, TrainerUnavailable
from tests.support.net import free_port
from tests.support.predictor import SYMBOL, predictor_settings

CONTRIBUTIONS = [
    {"feature": "rsi_14", "step": 0, "value": 71.5, "contribution": -0.12},
    {"feature": "macd_hist", "step": 3, "value": -0.0004, "contribution": 0.05},
]


async def _served(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})
    assert r.status_code == 200, r.text
    return str(r.json()["prediction_id"])


async def _insert(database_url: str, pid: str, status: str, **columns: Any) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO prediction_explanations (prediction_id, status, model_version, contributions, detail, "
            "error, attempts, finished_at) VALUES ($1::uuid, $2, $3, $4::jsonb, $5::jsonb, $6, $7, "
            "CASE WHEN $2 IN ('succeeded', 'failed') THEN now() END)",
            pid,
            status,
            columns.get("model_version"),
            orjson.dumps(columns["contributions"]).decode() if "contributions" in columns else None,
            orjson.dumps(columns.get("detail", {})).decode(),
            columns.get("error"),
            columns.get("attempts", 0),
        )
    finally:
        await conn.close()


async def test_succeeded_explanation_is_200_with_its_contributions(
    client: httpx.AsyncClient, database_url: str
) -> None:
    pid = await _served(client)
    detail = {"class": "BUY", "method": "shap.GradientExplainer", "base_value": 0.31}
    await _insert(database_url, pid, "succeeded", model_version="v1", contributions=CONTRIBUTIONS, detail=detail)
    r = await client.get(f"/v1/predictions/{pid}/explanation")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prediction_id"] == pid and body["status"] == "succeeded" and body["model_version"] == "v1"
    assert body["class"] == "BUY" and body["method"] == "shap.GradientExplainer" and body["base_value"] == 0.31
    assert body["contributions"] == CONTRIBUTIONS


@pytest.mark.parametrize("status", ["queued", "running"])
async def test_explanation_being_computed_is_202_with_retry_after(
    client: httpx.AsyncClient, database_url: str, status: str
) -> None:
    pid = await _served(client)
    await _insert(database_url, pid, status)
    r = await client.get(f"/v1/predictions/{pid}/explanation")
    assert r.status_code == 202, r.text
    assert r.headers["retry-after"] == "2"
    assert r.json() == {"prediction_id": pid, "status": status}


async def test_failed_explanation_is_409_with_the_trainers_error(client: httpx.AsyncClient, database_url: str) -> None:
    pid = await _served(client)
    await _insert(database_url, pid, "failed", error="model.onnx of v1 is gone from the store", attempts=3)
    r = await client.get(f"/v1/predictions/{pid}/explanation")
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "explanation_failed"
    assert "model.onnx of v1 is gone from the store" in r.json()["detail"] and "3 attempt" in r.json()["detail"]


async def test_unknown_or_malformed_prediction_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/predictions/{uuid.uuid4()}/explanation")
    assert r.status_code == 404 and "no prediction" in r.json()["detail"]
    r = await client.get("/v1/predictions/not-a-uuid/explanation")
    assert r.status_code == 404 and "UUIDs" in r.json()["detail"]


async def test_first_request_asks_the_trainer_for_a_just_served_prediction(
    client: httpx.AsyncClient, database_url: str
) -> None:
    # Asked right after it was served: the prediction may still be in the log's buffer, and the trainer
    # (which reads it from PostgreSQL, and answers 404 if it is not there) must find it.
    pid = await _served(client)
    r = await client.get(f"/v1/predictions/{pid}/explanation")
    assert r.status_code == 202, r.text
    assert r.headers["retry-after"] == "2"
    assert r.json() == {"prediction_id": pid, "status": "queued"}
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT status FROM prediction_explanations WHERE prediction_id = $1", pid) == (
            "queued"
        )
    finally:
        await conn.close()
    again = await client.get(f"/v1/predictions/{pid}/explanation")
    assert again.status_code == 202 and again.json()["status"] == "queued"


async def test_trainer_unreachable_is_503_naming_it(
    app: FastAPI, client: httpx.AsyncClient, database_url: str, redis_url: str, indicators_url: str, store_url: str
) -> None:
    pid = await _served(client)
    dead = f"http://127.0.0.1:{free_port()}"
    trainer = TrainerClient(predictor_settings(database_url, redis_url, indicators_url, store_url, trainer_url=dead))
    predictor = predictor_of(app)
    try:
        with pytest.raises(TrainerUnavailable) as caught:
            await Explanations(predictor.pool, predictor.log, trainer).get(uuid.UUID(pid))
    finally:
        await trainer.aclose()
    assert caught.value.status_code == 503
    assert dead in caught.value.message and "unreachable" in caught.value.message


async def test_trainer_refusing_the_key_is_503_for_the_operator(
    app: FastAPI, client: httpx.AsyncClient, database_url: str, redis_url: str, indicators_url: str, store_url: str
) -> None:
    pid = await _served(client)
    settings = predictor_settings(database_url, redis_url, indicators_url, store_url, trainer_api_key="wrong-key")
    trainer = TrainerClient(settings.model_copy(update={"trainer_url": str(predictor_of(app).settings.trainer_url)}))
    predictor = predictor_of(app)
    try:
        with pytest.raises(TrainerUnavailable, match="TRAINER_API_KEY"):
            await Explanations(predictor.pool, predictor.log, trainer).get(uuid.UUID(pid))
    finally:
        await trainer.aclose()


async def test_a_prediction_still_buffered_is_written_before_the_trainer_is_asked(app: FastAPI) -> None:
    from tests.predictor.test_prediction_log import _record

    predictor = predictor_of(app)
    plog = PredictionLog(
        predictor.pool, flush_seconds=60, batch_rows=100, buffer_rows=100, retention_days=0, prune_interval_seconds=60
    )  # never started: only a flush writes
    record = _record(time.time(), uuid.uuid4())
    plog.append(record)
    explanations = Explanations(predictor.pool, plog, explanations_of(app).trainer)
    answer = await explanations.get(record.prediction_id)
    assert answer.status_code == 202 and answer.body["status"] == "queued"
    assert not plog.buffer
