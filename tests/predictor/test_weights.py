"""Indicator weights: rows the trainer's optimiser writes are picked up by the poll, served with what they were
computed from, and used by indicator_score; the most specific scope wins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from services.predictor.repository import WeightsRow
from services.predictor.signals import VOTES, WeightsBook
from shared.bars import bars_to_rows
from shared.signal_rules import indicator_score
from shared.storage import ObjectStore
from tests.data import generate_bars
from tests.predictor.model_factory import FEATURES, register, write_model
from tests.support.keys import READ_KEY, WRITE_KEY

WSYMBOL = "PRED7"
WEIGHTS = {name: float(i % 4) for i, name in enumerate(VOTES)}  # unequal, some zero
CORRELATION = [[1.0 if i == j else 0.1 for j in range(len(FEATURES))] for i in range(len(FEATURES))]
INPUTS = {
    "importances": {name: 0.01 * (i + 1) for i, name in enumerate(FEATURES)},
    "correlation": CORRELATION,
    "feature_names": FEATURES,
    "hit_rates": {"rsi_14": 0.53},
    "samples": 2400,
}


@pytest.fixture(scope="module")
async def pred7(
    indicators_url: str, database_url: str, store: ObjectStore, scaler: tuple[list[float], list[float]]
) -> int:
    """Bars and a production model for PRED7; returns the model's registry id."""
    async with httpx.AsyncClient(base_url=indicators_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as ind:
        r = await ind.post(f"/v1/bars/{WSYMBOL}/H1", json={"bars": bars_to_rows(generate_bars("H1", 600, seed=17))})
        assert r.status_code == 200, r.text
    sha = write_model(store, WSYMBOL, "H1", "v1", mean=scaler[0], scale=scaler[1])
    await register(database_url, store, WSYMBOL, "H1", "v1", sha)
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT id FROM model_versions WHERE symbol = $1", WSYMBOL))
    finally:
        await conn.close()


async def _until(client: httpx.AsyncClient, path: str, ok: Callable[[Any], bool], timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        r = await client.get(path)
        if r.status_code == 200 and ok(r.json()):
            return r.json()
        assert time.monotonic() < deadline, f"{path} did not change in {timeout_s} s: {r.text}"
        await asyncio.sleep(0.1)


async def test_a_new_weights_row_is_served_and_used_by_indicator_score(
    client: httpx.AsyncClient, database_url: str, indicators_url: str, pred7: int
) -> None:
    body = {"symbol": WSYMBOL, "timeframe": "H1"}
    await _until(client, "/v1/models", lambda ms: any(m["symbol"] == WSYMBOL for m in ms))
    before = (await client.post("/v1/predictions", json=body)).json()
    assert before["weights_version"] == "equal-v1"

    start, end = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
    conn = await asyncpg.connect(database_url)
    try:
        row_id = await conn.fetchval(
            "INSERT INTO indicator_weights (symbol, timeframe, version, weights, method, model_version_id, inputs, "
            "data_start, data_end) VALUES ($1, 'H1', 'shap-v1', $2::jsonb, 'shap', $3, $4::jsonb, $5, $6) "
            "RETURNING id",
            WSYMBOL,
            orjson.dumps(WEIGHTS).decode(),
            pred7,
            orjson.dumps(INPUTS).decode(),
            start,
            end,
        )
    finally:
        await conn.close()

    # No notification for weights: the poll (MODEL_POLL_SECONDS, 1 s in tests) brings the row.
    w = await _until(client, f"/v1/weights?symbol={WSYMBOL}&timeframe=H1", lambda b: b["id"] == row_id)
    assert w["weights_version"] == "shap-v1" and w["method"] == "shap" and w["source"] == f"{WSYMBOL}/H1"
    assert w["weights"] == WEIGHTS and w["model_version_id"] == pred7
    assert w["importances"] == INPUTS["importances"] and w["correlation"] == CORRELATION
    assert w["feature_names"] == FEATURES
    assert w["inputs"] == {"hit_rates": {"rsi_14": 0.53}, "samples": 2400}
    assert str(w["data_start"]).startswith("2024-01-01") and str(w["data_end"]).startswith("2024-06-01")
    assert w["detail"] is None

    after = (await client.post("/v1/predictions", json=body)).json()
    assert after["weights_version"] == "shap-v1"
    assert after["cached"] is False  # new weights, new cache key: the score is not the old one
    async with httpx.AsyncClient(base_url=indicators_url, headers={"X-API-Key": READ_KEY}) as ind:
        rows = (await ind.get(f"/v1/indicators/{WSYMBOL}/H1", params={"limit": 1})).json()["timeframes"]["H1"]
    assert after["indicator_score"] == indicator_score(rows[-1]["values"], WEIGHTS)


async def test_default_scope_without_a_row_says_so(client: httpx.AsyncClient) -> None:
    body = (await client.get("/weights")).json()
    assert body["source"] == "default" and body["method"] == "default" and body["id"] is None
    assert body["correlation"] is None and body["importances"] is None
    assert "built-in equal weights" in body["detail"]


def test_the_most_specific_scope_wins() -> None:
    book = WeightsBook()
    book.replace(
        [
            WeightsRow("*", "*", "all-v1", {"rsi_14": 1.0}),
            WeightsRow("EURUSD", "*", "eur-v1", {"rsi_14": 2.0}),
            WeightsRow("EURUSD", "H1", "eur-h1-v1", {"rsi_14": 3.0}),
        ]
    )
    assert book.lookup("EURUSD", "H1").version == "eur-h1-v1"
    assert book.lookup("EURUSD", "H4").source == "EURUSD/*"
    assert book.lookup("GBPUSD", "H1").source == "*/*"
    assert book.lookup(None, None).version == "all-v1"
    assert WeightsBook().lookup("EURUSD", "H1").source == "default"
    # Indicators a row leaves out weigh 0; the cache token changes with the weights, not only the version.
    assert book.lookup("EURUSD", "H1").weights["macd_line"] == 0.0
    again = WeightsBook()
    again.replace([WeightsRow("EURUSD", "H1", "eur-h1-v1", {"rsi_14": 4.0})])
    assert again.lookup("EURUSD", "H1").cache_token != book.lookup("EURUSD", "H1").cache_token
