"""The indicators service over HTTP, against a real PostgreSQL database of this run."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from shared.bars import bars_to_rows
from shared.features import FEATURE_NAMES, compute_features, feature_rows
from shared.timeframes import OHLCV, Timeframe, resample
from shared.warmup import WARMUP_BARS
from tests.data import generate_bars
from tests.support.keys import READ_KEY, WRITE_KEY


async def _count(client: httpx.AsyncClient, symbol: str, tf: str) -> int:
    r = await client.get(f"/v1/bars/{symbol}/{tf}", params={"limit": 50_000})
    assert r.status_code == 200
    return len(r.json()["bars"])


@pytest.fixture(scope="module")
async def spx(indicators: httpx.AsyncClient, sp500: OHLCV) -> str:
    r = await indicators.post("/v1/bars/SPX/D1", json={"bars": bars_to_rows(sp500)})
    assert r.status_code == 200, r.text
    assert r.json()["inserted"] == len(sp500)
    assert await _count(indicators, "SPX", "D1") == len(sp500)
    return "SPX"


async def test_ingest_is_an_idempotent_upsert(indicators: httpx.AsyncClient, spx: str, sp500: OHLCV) -> None:
    body = bars_to_rows(sp500)[-100:]
    r = await indicators.post("/v1/bars/SPX/D1", json={"bars": body})
    assert r.json() == {"inserted": 0, "updated": 0, "flagged": r.json()["flagged"]}
    changed = dict(body[-1], close=body[-1]["close"] * 1.0001, high=body[-1]["high"] * 1.001)
    r = await indicators.post("/v1/bars/SPX/D1", json={"bars": [*body[:-1], changed]})
    assert (r.json()["inserted"], r.json()["updated"]) == (0, 1)
    # put the real bar back
    r = await indicators.post("/v1/bars/SPX/D1", json={"bars": body[-1:]})
    assert r.json()["updated"] == 1


async def test_bars_come_back_newest_last(indicators: httpx.AsyncClient, spx: str, sp500: OHLCV) -> None:
    r = await indicators.get("/v1/bars/SPX/D1", params={"limit": 3})
    bars = r.json()["bars"]
    assert [b["close"] for b in bars] == sp500.close[-3:].tolist()
    assert bars[-1]["ts"] == "2018-12-31T00:00:00Z"
    r = await indicators.get("/v1/bars/SPX/D1", params={"start": "2018-12-27T00:00:00Z", "end": "2018-12-31T00:00:00Z"})
    assert [b["ts"][:10] for b in r.json()["bars"]] == ["2018-12-27", "2018-12-28"]


async def test_unsorted_bars_are_sorted(indicators: httpx.AsyncClient) -> None:
    b = generate_bars("H1", 50, seed=5)
    body = bars_to_rows(b)[::-1]
    r = await indicators.post("/v1/bars/UNSORTED/H1", json={"bars": body})
    assert r.status_code == 200 and r.json()["inserted"] == 50
    got = (await indicators.get("/v1/bars/UNSORTED/H1")).json()["bars"]
    assert [x["close"] for x in got] == b.close.tolist()


def _valid(n: int = 30) -> list[dict[str, object]]:
    return bars_to_rows(generate_bars("H1", n, seed=9))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[17].update(close=float("nan")), "bar 17: close is nan"),
        (lambda b: b[3].update(volume=float("inf")), "bar 3: volume is inf"),
        (lambda b: b[4].update(open=-1.0), "bar 4: open -1.0 must be > 0"),
        (lambda b: b[5].update(high=b[5]["low"]), "bar 5: high"),
        (lambda b: b[6].update(low=b[6]["high"]), "bar 6: low"),
        (lambda b: b[7].update(volume=-5.0), "bar 7: volume -5.0 must be >= 0"),
        (lambda b: b[8].update(ts="2020-09-13T12:30:00Z"), "bar 8: ts 2020-09-13T12:30:00Z is not aligned to H1"),
        (lambda b: b[9].update(ts=b[2]["ts"]), "duplicate timestamp"),
        (lambda b: b[10].pop("close"), "bar 10: missing field close"),
        (lambda b: b[11].update(close="1.5"), "bar 11: close must be a number"),
        (lambda b: b[12].update(ts="yesterday"), "bar 12: ts 'yesterday' is not an ISO 8601 timestamp"),
        (lambda b: b[13].update(ts=b[13]["ts"].replace("Z", ".5Z")), "bar 13: ts '2020-09-14"),
        (lambda b: b[14].update(ts="2999-01-01T00:00:00Z"), "bar 14: ts 2999-01-01T00:00:00Z is out of range"),
        (lambda b: b[15].update(close=10**400), "bar 15: close is too large"),
    ],
)
async def test_invalid_bars_get_422_naming_the_bar_and_nothing_is_written(
    indicators: httpx.AsyncClient,
    mutate,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    bars = _valid()
    mutate(bars)
    # NaN/Infinity go out as JSON tokens, as some clients send them
    r = await indicators.post(
        "/v1/bars/BAD/H1", content=json.dumps({"bars": bars}), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "validation_error"
    assert message in r.json()["detail"]
    assert await _count(indicators, "BAD", "H1") == 0


async def test_epoch_timestamps_out_of_range_get_422(indicators: httpx.AsyncClient) -> None:
    bars = [{"ts": 86400 * 10**9, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0}]
    r = await indicators.post("/v1/bars/BAD/D1", json={"bars": bars})
    assert r.status_code == 422
    assert "bar 0: ts 86400000000000 is out of range" in r.json()["detail"]


async def test_stored_bars_are_unchanged_by_a_refused_batch(indicators: httpx.AsyncClient) -> None:
    good = _valid(30)
    assert (await indicators.post("/v1/bars/KEEP/H1", json={"bars": good})).status_code == 200
    before = (await indicators.get("/v1/bars/KEEP/H1")).json()["bars"]
    # every stored bar changed and ten new ones, with one invalid bar at the end
    changed = [dict(b, close=b["close"] * 1.001, high=b["high"] * 1.01) for b in good]
    extra = bars_to_rows(generate_bars("H1", 40, seed=9))[30:]
    bad = [*changed, *extra]
    bad[-1] = dict(bad[-1], volume=-1.0)
    r = await indicators.post("/v1/bars/KEEP/H1", json={"bars": bad})
    assert r.status_code == 422
    assert (await indicators.get("/v1/bars/KEEP/H1")).json()["bars"] == before


async def test_odd_query_values_get_422_not_500(indicators: httpx.AsyncClient, spx: str) -> None:
    r = await indicators.get("/v1/indicators/SPX/D1", params={"timeframes": ",,"})
    assert r.status_code == 422
    assert "timeframes is empty" in r.json()["detail"]
    r = await indicators.get("/v1/bars/SPX/D1", params={"start": "0001-01-01T00:00:00+14:00"})
    assert r.status_code == 422
    r = await indicators.get("/v1/series", params={"symbol": "\x00"})
    assert r.status_code == 422


async def test_a_bar_still_forming_enters_no_feature(indicators: httpx.AsyncClient) -> None:
    import time

    now = int(time.time())
    forming_open = now // 3600 * 3600
    b = generate_bars("H1", WARMUP_BARS + 30, start=forming_open - (WARMUP_BARS + 29) * 3600, seed=17)
    assert int(b.ts[-1]) == forming_open  # the newest bar opened this hour and has not closed
    assert (await indicators.post("/v1/bars/LIVE/H1", json={"bars": bars_to_rows(b)})).status_code == 200
    rows = (await indicators.get("/v1/indicators/LIVE/H1", params={"limit": 2})).json()["timeframes"]["H1"]
    last_closed = np.datetime_as_string(np.datetime64(forming_open - 3600, "s"))
    assert rows[-1]["ts"] == f"{last_closed}Z"
    expected = feature_rows(b.window(0, len(b) - 1)).values[-1]
    np.testing.assert_allclose(list(rows[-1]["values"].values()), expected, rtol=1e-9)


async def test_bad_path_parameters_get_422(indicators: httpx.AsyncClient) -> None:
    r = await indicators.post("/v1/bars/SPX/H2", json={"bars": _valid()})
    assert r.status_code == 422 and "unknown timeframe 'H2'" in r.json()["detail"]
    r = await indicators.post("/v1/bars/spx lower/H1", json={"bars": _valid()})
    assert r.status_code == 422 and "bad symbol" in r.json()["detail"]
    r = await indicators.post("/v1/bars/SPX/H1", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]


@pytest.mark.faults
async def test_more_than_50000_bars_get_413(indicators: httpx.AsyncClient) -> None:
    bars = [{"ts": i * 60, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0} for i in range(50_001)]
    r = await indicators.post("/v1/bars/BIG/M1", json={"bars": bars})
    assert r.status_code == 413
    assert await _count(indicators, "BIG", "M1") == 0


@pytest.mark.faults
async def test_auth_roles(indicators: httpx.AsyncClient) -> None:
    body = {"bars": _valid()}
    r = await indicators.post("/v1/bars/AUTH/H1", json=body, headers={"X-API-Key": ""})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = await indicators.post("/v1/bars/AUTH/H1", json=body, headers={"X-API-Key": "not-a-key-at-all-xx"})
    assert r.status_code == 401
    r = await indicators.post("/v1/bars/AUTH/H1", json=body, headers={"X-API-Key": READ_KEY})
    assert r.status_code == 403 and "needs write" in r.json()["detail"]
    r = await indicators.get("/v1/bars/AUTH/H1", headers={"X-API-Key": READ_KEY})
    assert r.status_code == 200
    r = await indicators.post("/v1/bars/AUTH/H1", json=body, headers={"X-API-Key": WRITE_KEY})
    assert r.status_code == 200


async def test_latest_rows_equal_rows_of_the_full_history(
    indicators: httpx.AsyncClient, spx: str, sp500: OHLCV
) -> None:
    full = feature_rows(sp500)
    r = await indicators.get("/v1/indicators/SPX/D1", params={"limit": 1})
    assert r.status_code == 200, r.text
    (row,) = r.json()["timeframes"]["D1"]
    assert row["ts"] == "2018-12-31T00:00:00Z"
    assert list(row["values"]) == list(FEATURE_NAMES)
    np.testing.assert_allclose(list(row["values"].values()), full.values[-1], rtol=1e-9, atol=0)
    r = await indicators.get("/v1/indicators/SPX/D1", params={"limit": 250})
    rows = r.json()["timeframes"]["D1"]
    assert len(rows) == 250
    np.testing.assert_allclose([list(x["values"].values()) for x in rows], full.values[-250:], rtol=1e-9, atol=0)


async def test_higher_timeframes_are_resampled_from_completed_bars(
    indicators: httpx.AsyncClient, spx: str, sp500: OHLCV
) -> None:
    r = await indicators.get("/v1/indicators/SPX/D1", params={"limit": 3, "timeframes": "D1,W1"})
    assert r.status_code == 200, r.text
    weekly = r.json()["timeframes"]["W1"]
    expected = feature_rows(resample(sp500, Timeframe.D1, Timeframe.W1))
    # 2018-12-31 (a Monday) opens a week that has not completed: the newest weekly row is the week before
    assert weekly[-1]["ts"] == "2018-12-24T00:00:00Z"
    np.testing.assert_allclose([list(x["values"].values()) for x in weekly], expected.values[-3:], rtol=1e-9)


async def test_indicators_of_unknown_or_short_series(indicators: httpx.AsyncClient) -> None:
    r = await indicators.get("/v1/indicators/NOPE/H1")
    assert r.status_code == 404 and "no H1 bars stored for NOPE" in r.json()["detail"]
    await indicators.post("/v1/bars/SHORT/H1", json={"bars": _valid(100)})
    r = await indicators.get("/v1/indicators/SHORT/H1")
    assert r.status_code == 422 and f"need at least {WARMUP_BARS + 1} H1 bars for SHORT, have 100" in r.json()["detail"]
    r = await indicators.get("/v1/indicators/SHORT/H1", params={"timeframes": "H4"})
    assert r.status_code == 422 and "completed H4 bars (from H1) for SHORT, have 25" in r.json()["detail"]
    r = await indicators.get("/v1/indicators/SHORT/H1", params={"timeframes": "M30"})
    assert r.status_code == 422 and "M30 cannot be built from H1 bars" in r.json()["detail"]


async def test_indicators_of_sent_bars(indicators: httpx.AsyncClient) -> None:
    b = generate_bars("H1", WARMUP_BARS + 40, seed=11)
    r = await indicators.post("/v1/indicators", json={"timeframe": "H1", "bars": bars_to_rows(b), "limit": 5})
    assert r.status_code == 200, r.text
    rows = r.json()["timeframes"]["H1"]
    np.testing.assert_allclose([list(x["values"].values()) for x in rows], compute_features(b)[-5:], rtol=1e-12)
    bad = bars_to_rows(b)
    bad[3]["high"] = 0.5 * bad[3]["low"]
    r = await indicators.post("/v1/indicators", json={"timeframe": "H1", "bars": bad})
    assert r.status_code == 422 and "bar 3: high" in r.json()["detail"]
    r = await indicators.post("/v1/indicators", json={"timeframe": "H1", "bars": bars_to_rows(b)[:50]})
    assert r.status_code == 422 and "have 50" in r.json()["detail"]


async def test_catalog_lists_17_features(indicators: httpx.AsyncClient) -> None:
    r = await indicators.get("/v1/indicators/catalog")
    entries = r.json()
    assert [e["name"] for e in entries] == list(FEATURE_NAMES)
    assert all(e["formula"] and e["description"] and e["warmup_bars"] == WARMUP_BARS for e in entries)


async def test_suspicious_bars_are_stored_and_flagged(indicators: httpx.AsyncClient) -> None:
    b = bars_to_rows(generate_bars("H1", 200, seed=13))
    spike = b[150]
    spike["close"] = spike["close"] * 1.2
    spike["high"] = max(spike["high"], spike["close"])
    del b[180:190]  # a 10-hour hole
    r = await indicators.post("/v1/bars/SPIKY/H1", json={"bars": b})
    assert r.status_code == 200
    assert r.json()["inserted"] == 190
    assert r.json()["flagged"] >= 2
    metrics = (await indicators.get("/metrics")).text
    assert 'market_bars_flagged_total{reason="move",symbol="SPIKY"}' in metrics
    assert 'market_bars_flagged_total{reason="gap",symbol="SPIKY"}' in metrics


async def test_rejections_and_staleness_are_in_metrics(indicators: httpx.AsyncClient, spx: str) -> None:
    bars = _valid()
    bars[0]["open"] = 0.0
    await indicators.post("/v1/bars/REJ/H1", json={"bars": bars})
    text = (await indicators.get("/metrics")).text
    assert 'market_bars_rejected_total{symbol="REJ"} 30.0' in text
    line = next(
        x for x in text.splitlines() if x.startswith('market_data_staleness_seconds{symbol="SPX",timeframe="D1"}')
    )
    # SPX's newest bar (2018-12-31) closed years ago
    assert float(line.split()[-1]) > 365 * 86400


async def test_request_id_is_returned(indicators: httpx.AsyncClient) -> None:
    r = await indicators.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await indicators.get("/health")
    assert len(r.headers["x-request-id"]) == 32


async def test_readiness_reports_the_database(indicators: httpx.AsyncClient) -> None:
    r = await indicators.get("/health/ready")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy"
    assert body["services"]["database"]["status"] == "healthy"
    assert body["services"]["database"]["latency_ms"] >= 0


async def test_openapi_documents_bodies_and_errors(indicators: httpx.AsyncClient) -> None:
    doc = (await indicators.get("/openapi.json")).json()
    post = doc["paths"]["/v1/bars/{symbol}/{timeframe}"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/BarsIn")
    assert {"401", "403", "413", "422"} <= set(post["responses"])
    assert "BarsIn" in doc["components"]["schemas"] and "Bar" in doc["components"]["schemas"]


async def test_columns_format_carries_the_same_numbers(indicators: httpx.AsyncClient, spx: str) -> None:
    rows = (await indicators.get("/v1/indicators/SPX/D1", params={"limit": 3})).json()["timeframes"]["D1"]
    r = await indicators.get("/v1/indicators/SPX/D1", params={"limit": 3, "format": "columns"})
    cols = r.json()["timeframes"]["D1"]
    assert cols["names"] == list(FEATURE_NAMES)
    assert cols["ts"] == [x["ts"] for x in rows]
    assert cols["values"] == [list(x["values"].values()) for x in rows]
    r = await indicators.get("/v1/indicators/SPX/D1", params={"format": "csv"})
    assert r.status_code == 422


async def test_ingest_notifies_listeners_after_commit(indicators: httpx.AsyncClient, database_url: str) -> None:
    import asyncio

    import asyncpg

    got: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener("market_series", lambda *args: got.put_nowait(args[-1]))
        b = bars_to_rows(generate_bars("H1", 10, seed=21))
        assert (await indicators.post("/v1/bars/NOTIFY/H1", json={"bars": b})).status_code == 200
        payload = json.loads(await asyncio.wait_for(got.get(), 5))
        assert payload["symbol"] == "NOTIFY"
        assert payload["timeframe"] == "H1"
        # the same bars again change nothing and notify nobody
        assert (await indicators.post("/v1/bars/NOTIFY/H1", json={"bars": b})).json()["updated"] == 0
        await asyncio.sleep(0.3)
        assert got.empty()
    finally:
        await conn.close()
