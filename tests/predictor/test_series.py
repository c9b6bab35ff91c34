"""Series stamps in memory: a cached prediction never outlives a change of the bars it was computed on."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import FastAPI

from shared.bars import bars_to_rows
from shared.storage import ObjectStore
from shared.timeframes import OHLCV
from tests.predictor.model_factory import register, write_model
from tests.support.keys import WRITE_KEY
from tests.support.predictor import SYMBOL

FRESH = "PRED5"


async def _wait(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_new_bars_invalidate_cached_predictions_by_notification(
    app: FastAPI,
    client: httpx.AsyncClient,
    indicators_url: str,
    database_url: str,
    store: ObjectStore,
    hourly_bars: OHLCV,
    scaler: tuple[list[float], list[float]],
) -> None:
    rows = bars_to_rows(hourly_bars)
    async with httpx.AsyncClient(base_url=indicators_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as ind:
        r = await ind.post(f"/v1/bars/{FRESH}/H1", json={"bars": rows[:-1]})
        assert r.status_code == 200, r.text
        sha = write_model(store, FRESH, "H1", "v1", seed=5, mean=scaler[0], scale=scaler[1], temperature=1.5)
        await register(database_url, store, FRESH, "H1", "v1", sha)
        predictor = app.state.predictor
        await _wait(lambda: predictor.models.get(FRESH, "H1") is not None)

        body = {"symbol": FRESH, "timeframe": "H1"}
        first = (await client.post("/v1/predictions", json=body)).json()
        hits = predictor.cache.l1_hits
        second = (await client.post("/v1/predictions", json=body)).json()
        assert (first["cached"], second["cached"]) == (False, True)
        assert predictor.cache.l1_hits == hits + 1  # served from the in-process tier
        assert first["bar_ts"][:19] == str(rows[-2]["ts"])[:19]

        seen = predictor.series.notifications
        r = await ind.post(f"/v1/bars/{FRESH}/H1", json={"bars": rows[-1:]})
        assert r.status_code == 200, r.text
        await _wait(lambda: predictor.series.notifications > seen)

    third = (await client.post("/v1/predictions", json=body)).json()
    assert third["cached"] is False
    assert third["bar_ts"][:19] == str(rows[-1]["ts"])[:19]
    assert (await client.post("/v1/predictions", json=body)).json()["cached"] is True


async def test_stamps_are_read_per_request_while_not_listening(app: FastAPI) -> None:
    from services.predictor.series import SeriesStamps

    live: SeriesStamps = app.state.predictor.series
    deaf = SeriesStamps(live.pool, None, poll_seconds=60)  # never listens: nothing would tell it of a change

    stamp = await deaf.get(SYMBOL, "H1")
    assert stamp is not None and stamp == await live.get(SYMBOL, "H1")
    assert not deaf._stamps  # not kept: the next request reads it again
