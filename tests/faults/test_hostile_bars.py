"""Fault case 1, hostile bars (hypothesis): NaN/Infinity tokens, ±inf, zero and negative prices, high < low,
duplicate and unaligned timestamps, wrong types, NUL bytes, numbers too large, future and fractional timestamps,
malformed structure, and batches over the 50,000-bar limit, at every endpoint that takes bars: the indicators
ingest (`POST /v1/bars/...`), the indicators computed on sent bars (`POST /v1/indicators`) and the predictor's
inline bars (`POST /v1/predictions` with `bars`). The trainer takes no bars from clients (it reads stored ones).

Pass criterion: every hostile batch gets a 4xx `{"error", "detail"}` whose detail names the bar and the rule
broken, never a 500; afterwards the series' stored bars are exactly what they were (count and values: the batch
overlaps stored bars with other values, so a partial write would show) and no prediction was logged.
Measured (2 cores, shared): 100 examples × 3 endpoints in 1.7-5 s, after a 6-20 s start of the three apps; a
50,001-bar batch is refused in 0.3-1.1 s per endpoint (parsing the 5 MB body is most of it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.bars import FIELDS, bars_to_rows
from shared.storage import store_from_url
from tests.data import generate_bars
from tests.predictor.model_factory import register, write_model
from tests.support.faults_apps import KEYS, Service, retire, row_count, three_apps

SYMBOL = "HOSTILE"
STORED = 40  # bars stored before the hostile ones arrive
BASE = bars_to_rows(generate_bars("H1", 80, seed=11))  # the first STORED of these, with other values, are stored
HOUR = 3600


@pytest.fixture(scope="module")
async def services(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Service]]:
    store_dir = tmp_path_factory.mktemp("hostile-models")
    # A served series, so the predictor reaches the validation of inline bars (without a model it answers 404).
    store = store_from_url(f"file://{store_dir}")
    await register(database_url, store, SYMBOL, "H1", "h1", write_model(store, SYMBOL, "H1", "h1"))
    async with three_apps(database_url, redis_url, Path(store_dir)) as apps:
        stored = bars_to_rows(generate_bars("H1", STORED, seed=12))
        r = await apps["indicators"].client.post(
            f"/v1/bars/{SYMBOL}/H1", json={"bars": stored}, headers={"X-API-Key": KEYS["write"]}
        )
        assert r.status_code == 200, r.text
        yield apps
    await retire(database_url, SYMBOL)


async def stored_state(services: dict[str, Service]) -> tuple[int, float, float]:
    """Count and value fingerprints of the series' stored bars (SQL on the indicators app's own pool: a new
    connection per example would be most of the test's time)."""
    row = await services["indicators"].app.state.pool.fetchrow(
        "SELECT count(*), coalesce(sum(close), 0), coalesce(sum(volume), 0) FROM bars WHERE symbol = $1", SYMBOL
    )
    return int(row[0]), float(row[1]), float(row[2])


@dataclass
class Hostile:
    body_bars: Any  # what goes in the "bars" field (a list of bars, or something that is not)
    needles: tuple[str, ...]  # every one must appear in the detail (empty: only a 4xx with a message)
    what: str


def _epoch(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def _iso(epoch: int, suffix: str = "Z") -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S") + suffix


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:
    start = draw(st.integers(0, 60))
    n = draw(st.integers(2, 20))
    bars = [dict(b) for b in BASE[start : start + n]]
    if draw(st.booleans()):  # epoch seconds instead of ISO strings
        for b in bars:
            b["ts"] = _epoch(str(b["ts"]))
    i = draw(st.integers(0, n - 1))
    bar = bars[i]
    field = draw(st.sampled_from(FIELDS))
    price = draw(st.sampled_from(("open", "high", "low", "close")))
    kind = draw(
        st.sampled_from(
            (
                "nonfinite",
                "nonpositive",
                "negative_volume",
                "high_below_low",
                "low_above_high",
                "duplicate",
                "unaligned",
                "wrong_type",
                "wrong_ts_type",
                "nul_in_ts",
                "future",
                "fractional",
                "too_large",
                "missing",
                "not_an_object",
                "structure",
            )
        )
    )
    at = f"bar {i}:"
    ts = _epoch(str(BASE[start + i]["ts"]))
    match kind:
        case "nonfinite":
            bar[field] = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
            return Hostile(bars, (at, field, "finite"), kind)
        case "nonpositive":
            bar[price] = draw(st.sampled_from((0, 0.0, -0.0, -1e-9, -1.5, -1e300)))
            return Hostile(bars, (at, price), kind)
        case "negative_volume":
            bar["volume"] = draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
            return Hostile(bars, (at, "volume", ">= 0"), kind)
        case "high_below_low":
            bar["high"] = float(bar["low"]) * draw(st.floats(0.5, 0.999))
            return Hostile(bars, (at, "high"), kind)
        case "low_above_high":
            bar["low"] = float(bar["high"]) * draw(st.floats(1.001, 2.0))
            return Hostile(bars, (at, "low"), kind)
        case "duplicate":
            j = draw(st.integers(0, n - 1).filter(lambda j: j != i))
            bar["ts"] = bars[j]["ts"]
            return Hostile(bars, ("duplicate timestamp",), kind)
        case "unaligned":
            off = draw(st.integers(1, HOUR - 1))
            bar["ts"] = ts + off if isinstance(bar["ts"], int) else _iso(ts + off)
            return Hostile(bars, (at, "not aligned to H1"), kind)
        case "wrong_type":
            bar[field] = draw(st.sampled_from(("1.5", "", True, False, [1.0], {"v": 1.0}, "NaN")))
            return Hostile(bars, (at, field, "must be a number"), kind)
        case "wrong_ts_type":
            bar["ts"] = draw(st.sampled_from((True, float(ts), None, [ts], {"s": ts}, ts + 0.5)))
            return Hostile(bars, (at, "ts"), kind)
        case "nul_in_ts":
            iso = _iso(ts, "")
            pos = draw(st.integers(0, len(iso)))
            bar["ts"] = iso[:pos] + "\x00" + iso[pos:] + "Z"
            return Hostile(bars, (at, "ts"), kind)
        case "future":
            bar["ts"] = int(time.time()) // HOUR * HOUR + HOUR * draw(st.integers(2, 10**6))
            return Hostile(bars, (at, "out of range"), kind)
        case "fractional":
            bar["ts"] = _iso(ts, "." + str(draw(st.integers(1, 999))) + "Z")
            return Hostile(bars, (at, "fractional seconds"), kind)
        case "too_large":
            bar[field] = draw(st.sampled_from((10**400, -(10**400), 2**64 * 10**300)))
            return Hostile(bars, (at, field), kind)
        case "missing":
            del bar[field]
            return Hostile(bars, (at, f"missing field {field}"), kind)
        case "not_an_object":
            bars[i] = draw(st.sampled_from((None, 1, "bar", [1, 2, 3, 4, 5, 6])))
            return Hostile(bars, (at, "must be an object"), kind)
        case _:
            return Hostile(draw(st.sampled_from(({"0": bar}, "bars", 17, None, []))), (), kind)


def dumps(obj: object) -> bytes:
    # allow_nan writes NaN / Infinity / -Infinity tokens, as careless clients do (not JSON: httpx json= refuses)
    return json.dumps(obj, allow_nan=True).encode()


def check_refused(r: Any, case: Hostile, where: str) -> None:
    assert 400 <= r.status_code < 500, f"{where} {case.what}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert body["error"] and body["detail"], f"{where} {case.what}: {body}"
    for needle in case.needles:
        assert needle in body["detail"], f"{where} {case.what}: {needle!r} not in {body['detail']!r}"


@given(case=hostile())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_hostile_batches_are_refused_whole_everywhere(services: dict[str, Service], case: Hostile) -> None:
    ind, predictor = services["indicators"], services["predictor"]
    before = await stored_state(services)
    headers = {"content-type": "application/json"}
    r = await ind.client.post(
        f"/v1/bars/{SYMBOL}/H1",
        content=dumps({"bars": case.body_bars}),
        headers={**headers, "X-API-Key": KEYS["write"]},
    )
    check_refused(r, case, "ingest")
    assert await stored_state(services) == before, f"ingest {case.what}: stored bars changed"
    r = await ind.client.post(
        "/v1/indicators",
        content=dumps({"symbol": SYMBOL, "timeframe": "H1", "bars": case.body_bars}),
        headers={**headers, "X-API-Key": KEYS["read"]},
    )
    check_refused(r, case, "indicators")
    if case.body_bars is None:  # the predictor reads `"bars": null` as "no bars sent": it uses the stored ones
        return
    r = await predictor.client.post(
        "/v1/predictions",
        content=dumps({"symbol": SYMBOL, "timeframe": "H1", "bars": case.body_bars}),
        headers={**headers, "X-API-Key": KEYS["read"], "Cache-Control": "no-cache"},
    )
    # The predictor refuses a "bars" that is not a list before the bar rules (its own message says so).
    check_refused(r, case if isinstance(case.body_bars, list) else Hostile(None, (), case.what), "predictor")


async def test_nothing_was_logged_for_the_refused_predictions(services: dict[str, Service], database_url: str) -> None:
    """Runs after the hypothesis test (file order): no refused request left a prediction row."""
    assert await row_count(database_url, "SELECT count(*) FROM predictions WHERE symbol = $1", SYMBOL) == 0


async def test_a_batch_over_50000_bars_is_413_at_every_bars_endpoint(
    services: dict[str, Service],
) -> None:
    over = [{"ts": 3600 * k, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0} for k in range(50_001)]
    before = await stored_state(services)
    calls = (
        ("indicators", f"/v1/bars/{SYMBOL}/H1", {"bars": over}, "write"),
        ("indicators", "/v1/indicators", {"symbol": SYMBOL, "timeframe": "H1", "bars": over}, "read"),
        ("predictor", "/v1/predictions", {"symbol": SYMBOL, "timeframe": "H1", "bars": over}, "read"),
    )
    for name, path, body, role in calls:
        start = time.perf_counter()
        r = await services[name].client.post(path, content=dumps(body), headers={"X-API-Key": KEYS[role]})
        took = time.perf_counter() - start
        assert r.status_code == 413, f"{name} {path}: {r.status_code} {r.text[:200]}"
        assert "50001 bars" in r.json()["detail"] and "50000" in r.json()["detail"]
        print(f"{name} {path}: 50,001 bars refused in {took:.3f} s")
    assert await stored_state(services) == before


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"bars": [{"ts": 0, "open": NaN, "high": 1, "low": 1, "close": 1, "volume": 0}]}', "open is nan"),
        (b'{"bars": [{"ts": 0, "open": 1, "high": Infinity, "low": 1, "close": 1, "volume": 0}]}', "high is inf"),
        (b'{"bars": [{"ts": 0, "open": 1, "high": 1, "low": -Infinity, "close": 1, "volume": 0}]}', "low is -inf"),
        (b'{"bars": [{"ts": 0, "open": 1, "high": 1, "low": 1, "close": 1e999, "volume": 0}]}', "close is inf"),
        (b'{"bars": [{"ts": 0, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 0}', "not valid JSON"),
        (b'\x00{"bars": []}', "not valid JSON"),
        (
            b'{"bars": [{"ts": "1970-01-01T00:00:00Z\\u0000", '
            b'"open": 1, "high": 1, "low": 1, "close": 1, "volume": 0}]}',
            "bar 0: ts",
        ),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
async def test_raw_tokens_and_bytes_are_named(services: dict[str, Service], body: bytes, needle: str) -> None:
    """Raw bodies no JSON library would write: NaN/Infinity tokens, an overflowing exponent, NUL and invalid
    UTF-8 bytes, truncation."""
    before = await stored_state(services)
    r = await services["indicators"].client.post(
        f"/v1/bars/{SYMBOL}/H1", content=body, headers={"X-API-Key": KEYS["write"], "content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"], r.json()
    assert await stored_state(services) == before
