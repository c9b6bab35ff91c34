"""Outcome settlement (services/trainer/settlement.py): predictions logged first, bars arriving after them, one
outcome per (version, variant, bar) with hand-checked figures, no look-ahead past the horizon, idempotent reruns,
and the performance flag of a live hit rate below the validation figure."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
import pytest

from services.trainer import repository as repo
from services.trainer.settings import TrainerSettings
from services.trainer.settlement import Outcome, insert_outcomes, live_rows, run_settlement, wilson_interval
from services.trainer.weights import LiveRows, hit_rate_votes
from shared.features import FEATURE_NAMES
from shared.model_metadata import ModelMetadata, artifact_prefix
from shared.storage import ObjectStore, sha256_hex, store_from_url
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars
from tests.predictor.model_factory import FEATURES, register, write_model
from tests.support.keys import API_KEYS
from tests.support.trainer import ingest

pytestmark = pytest.mark.asyncio(loop_scope="session")

H = 5  # the horizon of tests.predictor.model_factory's metadata (dead band 0.5 ATR)
DEAD_BAND = 0.5
COST = 2.0e-4  # TRAINER_OUTCOME_COST_BPS 2.0, round trip
ATR = FEATURES.index("atr_14_pct")
N = 600
T = 559  # index of the bar the predictions are made on: the newest bar stored when they are logged


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ObjectStore:
    return store_from_url(f"file://{tmp_path_factory.mktemp('settle-models')}")


@pytest.fixture(scope="module")
def settings(database_url: str, store: ObjectStore) -> TrainerSettings:
    return TrainerSettings(
        database_url=database_url,
        model_store_url=store.url,
        api_keys=API_KEYS,
        environment="test",
        trainer_performance_min_bars=20,
    )


@pytest.fixture(scope="module")
def bars() -> OHLCV:
    b = generate_bars("H1", N, seed=11)
    # The generator opens each bar at the previous close: move the open of bar T+1 so that the PnL (from the next
    # bar's open) and the realised return (from bar T's close) differ.
    b.open[T + 1] *= 1.0007
    b.high[T + 1] = max(b.high[T + 1], b.open[T + 1])
    return b


def _window(atr_pct: float, seed: int) -> npt.NDArray[np.float32]:
    w = np.random.default_rng(seed).normal(0, 1, (20, len(FEATURES))).astype(np.float32)
    w[-1, ATR] = atr_pct
    return w


async def log_prediction(
    conn: asyncpg.Connection,
    symbol: str,
    bar_ts: int,
    version: str,
    variant: str,
    probabilities: list[float],
    window: npt.NDArray[np.float32],
    created: datetime,
) -> uuid.UUID:
    """A prediction-log row and its window, as the predictor's log writer stores them."""
    signal = ("SELL", "HOLD", "BUY")[int(np.argmax(probabilities))]
    w32 = np.ascontiguousarray(window, dtype=np.float32)
    h = hashlib.sha256(w32.tobytes() + str(w32.shape).encode()).hexdigest()
    await conn.execute(
        "INSERT INTO prediction_windows (window_hash, created_at, features, feature_shape) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT DO NOTHING",
        h,
        created,
        w32.ravel().tolist(),
        list(w32.shape),
    )
    pid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO predictions (id, created_at, symbol, timeframe, bar_ts, model_version, variant, window_hash, "
        "probabilities, signal, confidence, consensus_signal, cached) "
        "VALUES ($1, $2, $3, 'H1', to_timestamp($4), $5, $6, $7, $8, $9, $10, $9, false)",
        pid,
        created,
        symbol,
        bar_ts,
        version,
        variant,
        h,
        probabilities,
        signal,
        max(probabilities),
    )
    return pid


async def _outcomes(database_url: str, symbol: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT model_version, variant, extract(epoch FROM bar_ts)::bigint AS t, prediction_id, signal, "
            "probabilities, horizon, realised_log_return, realised_label, hit, pnl FROM bar_outcomes "
            "WHERE symbol = $1 ORDER BY bar_ts, model_version, variant",
            symbol,
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


def _at(bars: OHLCV, i: int) -> datetime:
    return datetime.fromtimestamp(int(bars.ts[i]), UTC)


async def _setup_series(
    database_url: str, store: ObjectStore, symbol: str, bars: OHLCV, *, candidate: bool
) -> dict[str, uuid.UUID]:
    """Models v1 (production) and optionally v2 (candidate), bars up to T, and the predictions on bars T-1 and T."""
    await register(database_url, store, symbol, "H1", "v1", write_model(store, symbol, "H1", "v1", seed=1))
    if candidate:
        sha = write_model(store, symbol, "H1", "v2", seed=2)
        await register(database_url, store, symbol, "H1", "v2", sha, status="candidate")
    await ingest(database_url, symbol, Timeframe.H1, bars.window(0, T + 1))
    r = math.log(bars.close[T + H] / bars.close[T])
    conn = await asyncpg.connect(database_url)
    ids: dict[str, uuid.UUID] = {}
    try:
        # Bar T: five requests for the same bar; the earliest says BUY, the later ones SELL. ATR(14)/close = |r|
        # puts the dead band at |r|/2, so the realised label is the sign of r.
        win_t = _window(abs(r), seed=1)
        first = _at(bars, T) + timedelta(hours=1, seconds=5)
        ids["t_first"] = await log_prediction(
            conn, symbol, int(bars.ts[T]), "v1", "production", [0.2, 0.3, 0.5], win_t, first
        )
        for k in range(1, 5):
            await log_prediction(
                conn, symbol, int(bars.ts[T]), "v1", "production", [0.6, 0.2, 0.2], win_t, first + timedelta(seconds=k)
            )
        if candidate:
            for k in range(2):
                pid = await log_prediction(
                    conn, symbol, int(bars.ts[T]), "v2", "shadow", [0.2, 0.5, 0.3], win_t, first + timedelta(seconds=k)
                )
                ids.setdefault("t_shadow", pid)
            # Bar T-1, only v1: a dead band of 0.5 x 1.0 makes it HOLD whatever the market did.
            ids["t_minus_1"] = await log_prediction(
                conn,
                symbol,
                int(bars.ts[T - 1]),
                "v1",
                "production",
                [0.7, 0.2, 0.1],
                _window(1.0, seed=2),
                _at(bars, T - 1) + timedelta(hours=1, seconds=1),
            )
    finally:
        await conn.close()
    return ids


async def test_settles_once_per_version_variant_and_bar_when_the_horizon_bars_arrive(
    database_url: str, store: ObjectStore, settings: TrainerSettings, bars: OHLCV
) -> None:
    symbol = "SETL1"
    ids = await _setup_series(database_url, store, symbol, bars, candidate=True)

    first = await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={symbol})
    assert first["settled"] == 0
    assert await _outcomes(database_url, symbol) == []

    # Four more bars: bar T-1 has its horizon (T+4), bar T does not yet.
    await ingest(database_url, symbol, Timeframe.H1, bars.window(T + 1, T + 5))
    second = await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={symbol})
    assert second["settled"] == 1
    rows = await _outcomes(database_url, symbol)
    assert [(r["model_version"], r["variant"], r["t"]) for r in rows] == [("v1", "production", int(bars.ts[T - 1]))]

    await ingest(database_url, symbol, Timeframe.H1, bars.window(T + 5, T + 6))
    third = await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={symbol})
    assert third["settled"] == 2
    rows = await _outcomes(database_url, symbol)
    assert [(r["model_version"], r["variant"], r["t"]) for r in rows] == [
        ("v1", "production", int(bars.ts[T - 1])),
        ("v1", "production", int(bars.ts[T])),
        ("v2", "shadow", int(bars.ts[T])),
    ]
    c, o = bars.close, bars.open
    # Bar T-1, SELL, dead band 0.5 x 1.0: HOLD realised, a miss; short from open[T] to close[T+4], minus costs.
    r0 = math.log(c[T - 1 + H] / c[T - 1])
    assert rows[0]["prediction_id"] == ids["t_minus_1"]
    assert rows[0]["realised_log_return"] == pytest.approx(r0, abs=1e-12)
    assert (rows[0]["signal"], rows[0]["realised_label"], rows[0]["hit"]) == ("SELL", "HOLD", False)
    assert rows[0]["pnl"] == pytest.approx(-math.log(c[T + 4] / o[T]) - COST, abs=1e-12)
    # Bar T, v1: the earliest of the five requests (BUY) is the one settled.
    r = math.log(c[T + H] / c[T])
    label = "BUY" if r > 0 else "SELL"
    assert rows[1]["prediction_id"] == ids["t_first"]
    assert rows[1]["horizon"] == H
    assert rows[1]["probabilities"] == pytest.approx([0.2, 0.3, 0.5])
    assert rows[1]["realised_log_return"] == pytest.approx(r, abs=1e-12)
    assert (rows[1]["signal"], rows[1]["realised_label"], rows[1]["hit"]) == ("BUY", label, label == "BUY")
    assert rows[1]["pnl"] == pytest.approx(math.log(c[T + H] / o[T + 1]) - COST, abs=1e-12)
    assert rows[1]["pnl"] != pytest.approx(r - COST, abs=1e-6)  # from the next bar's open, not bar T's close
    # Bar T, v2 in shadow: HOLD, so a miss (the label is directional) and no position, no cost.
    assert rows[2]["prediction_id"] == ids["t_shadow"]
    assert (rows[2]["signal"], rows[2]["realised_label"], rows[2]["hit"], rows[2]["pnl"]) == ("HOLD", label, False, 0.0)

    # Idempotent: a rerun (and bars arriving later) settle nothing twice and change nothing.
    await ingest(database_url, symbol, Timeframe.H1, bars.window(T + 6, N))
    again = await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={symbol})
    assert again["settled"] == 0
    assert await _outcomes(database_url, symbol) == rows


async def test_bars_after_the_horizon_do_not_change_the_outcome(
    database_url: str, store: ObjectStore, settings: TrainerSettings, bars: OHLCV
) -> None:
    """Two series with the same bars up to T+h and very different ones after it settle to the same outcome."""
    moved = OHLCV(bars.ts.copy(), bars.open.copy(), bars.high.copy(), bars.low.copy(), bars.close.copy(), bars.volume)
    for col in (moved.open, moved.high, moved.low, moved.close):
        col[T + H + 1 :] *= 1.3
    results = []
    for symbol, series in (("SETLA", bars), ("SETLB", moved)):
        await _setup_series(database_url, store, symbol, series, candidate=False)
        await ingest(database_url, symbol, Timeframe.H1, series.window(T + 1, N))
        await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={symbol})
        (row,) = await _outcomes(database_url, symbol)
        results.append({k: row[k] for k in ("t", "realised_log_return", "realised_label", "hit", "pnl")})
    assert results[0] == results[1]


async def test_concurrent_inserts_keep_one_row_per_key(database_url: str) -> None:
    ts = datetime(2021, 1, 4, tzinfo=UTC)
    outcomes = [
        Outcome(
            uuid.uuid4(),
            "c1",
            "production",
            ts + timedelta(hours=k),
            [0.2, 0.3, 0.5],
            "BUY",
            0.5,
            5,
            0.01,
            "BUY",
            True,
            0.0098,
        )
        for k in range(20)
    ]
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        counts = await asyncio.gather(*(insert_outcomes(c, "SETLC", "H1", outcomes) for c in conns))
        assert sum(counts) == 20  # each key inserted by exactly one of the two
        assert await insert_outcomes(conns[0], "SETLC", "H1", outcomes) == 0
        n = await conns[0].fetchval("SELECT count(*) FROM bar_outcomes WHERE symbol = 'SETLC'")
        assert n == 20
    finally:
        for c in conns:
            await c.close()


async def _plant_outcomes(conn: asyncpg.Connection, symbol: str, version: str, n: int, hits: int) -> None:
    """Settled production outcomes as settlement writes them (the flag reads only these)."""
    start = datetime(2021, 3, 1, tzinfo=UTC)
    for k in range(n):
        hit = k < hits
        await conn.execute(
            "INSERT INTO bar_outcomes (symbol, timeframe, model_version, variant, bar_ts, prediction_id, "
            "probabilities, signal, confidence, horizon, realised_log_return, realised_label, hit, pnl) "
            "VALUES ($1, 'H1', $2, 'production', $3, $4, '{0.2,0.3,0.5}', 'BUY', 0.5, 5, 0.0, $5, $6, 0.0)",
            symbol,
            version,
            start + timedelta(hours=k),
            uuid.uuid4(),
            "BUY" if hit else "SELL",
            hit,
        )


async def test_performance_flag_for_a_live_hit_rate_below_validation(
    database_url: str, store: ObjectStore, settings: TrainerSettings
) -> None:
    bad, good, few = "PERFBAD", "PERFGOOD", "PERFFEW"
    for symbol in (bad, good, few):
        await register(database_url, store, symbol, "H1", "v1", write_model(store, symbol, "H1", "v1"))
    conn = await asyncpg.connect(database_url)
    try:
        for symbol, accuracy in ((bad, 0.6), (good, 0.9), (few, 0.9)):
            await conn.execute(
                "UPDATE model_versions SET metrics = $2::jsonb WHERE symbol = $1",
                symbol,
                json.dumps({"accuracy": accuracy}),
            )
        # The good version's walk-forward validation says 0.5: that, not its 0.9 test-split accuracy, is the bar.
        good_v = await repo.find_version(conn, good, "H1", "v1")
        assert good_v is not None
        await repo.insert_validation(
            conn,
            model_version_id=good_v.id,
            symbol=good,
            timeframe="H1",
            job_id=f"settle-test-{uuid.uuid4().hex}",
            folds=3,
            data_start=datetime(2020, 1, 1, tzinfo=UTC),
            data_end=datetime(2020, 6, 1, tzinfo=UTC),
            report={"models": {"lstm": {"pooled": {"metrics": {"accuracy": 0.5}}}}},
        )
        await _plant_outcomes(conn, bad, "v1", 30, 6)  # 0.20, 95 % CI up to about 0.37 < 0.6
        await _plant_outcomes(conn, good, "v1", 30, 18)  # 0.60, CI about 0.42-0.75: not below 0.5
        await _plant_outcomes(conn, few, "v1", 10, 0)  # fewer than the 20 bars needed
        await repo.set_flags(conn, bad, "H1", drift=True, performance=False, reason="feature drift: rsi_14")
    finally:
        await conn.close()

    result = await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={bad, good, few})
    by_symbol = {p["symbol"]: p for p in result["performance"]}
    assert by_symbol[bad]["flagged"] is True
    assert by_symbol[bad]["ci_high"] == pytest.approx(wilson_interval(6, 30)[1])
    assert by_symbol[bad]["ci_high"] < 0.6
    assert by_symbol[good]["flagged"] is False
    assert by_symbol[good]["reference"] == 0.5
    assert by_symbol[good]["reference_source"] == "walk-forward validation, pooled accuracy"
    assert by_symbol[few] == {"symbol": few, "timeframe": "H1", "model_version": "v1", "bars": 10, "flagged": False}

    conn = await asyncpg.connect(database_url)
    try:
        flags_bad = await repo.get_flags(conn, bad, "H1")
        assert flags_bad is not None and flags_bad.performance and flags_bad.drift  # drift kept
        assert (
            flags_bad.reason is not None and "rsi_14" in flags_bad.reason and "live hit rate 0.200" in flags_bad.reason
        )
        for symbol in (good, few):
            flags = await repo.get_flags(conn, symbol, "H1")
            assert flags is None or not flags.performance
    finally:
        await conn.close()


async def test_live_rows_feed_the_weights_hit_rate_term(database_url: str, bars: OHLCV) -> None:
    """After the first test settled SETL1: its v1 bars as live rows (window's newest row, FEATURE_NAMES order),
    and the weights' hit-rate term switches to them once there are enough."""
    conn = await asyncpg.connect(database_url)
    try:
        live = await live_rows(conn, "SETL1", "H1", "v1", FEATURES)
        labels_by_bar = [
            r["realised_label"]
            for r in await conn.fetch(
                "SELECT realised_label FROM bar_outcomes WHERE symbol = 'SETL1' AND model_version = 'v1' "
                "ORDER BY bar_ts"
            )
        ]
    finally:
        await conn.close()
    assert len(live) == 2
    assert [("SELL", "HOLD", "BUY")[k] for k in live.y] == labels_by_bar
    atr = FEATURE_NAMES.index("atr_14_pct")
    assert live.raw[0, atr] == pytest.approx(1.0)  # bar T-1's planted window
    assert live.raw[1, atr] == pytest.approx(abs(math.log(bars.close[T + H] / bars.close[T])), rel=1e-6)  # bar T's

    # Planted: RSI votes BUY (< 30) where the market went up and SELL (> 70) where it went down, 30 bars each.
    rng = np.random.default_rng(0)
    rsi = FEATURE_NAMES.index("rsi_14")
    held = rng.normal(50, 30, (200, len(FEATURE_NAMES)))
    held_y = rng.integers(0, 3, 200)
    raw = rng.normal(0, 1, (60, len(FEATURE_NAMES)))
    raw[:30, rsi], raw[30:, rsi] = 20.0, 80.0
    planted = LiveRows(raw=raw, y=np.r_[np.full(30, 2), np.full(30, 0)].astype(np.int64))
    votes, source = hit_rate_votes(held, held_y, planted, min_live_bars=60)
    assert source == "live" and votes["rsi_14"]["hit_rate"] == 1.0 and votes["rsi_14"]["votes"] == 60
    votes, source = hit_rate_votes(held, held_y, planted, min_live_bars=61)
    assert source == "val" and votes["rsi_14"]["hit_rate"] != 1.0
    assert hit_rate_votes(held, held_y, None, min_live_bars=1)[1] == "val"


def _model_with_horizon(store: ObjectStore, symbol: str, version: str, horizon: int) -> str:
    """model_factory's model with another label horizon; returns sha256(metadata.json) for the registry."""
    write_model(store, symbol, "H1", version)
    key = artifact_prefix(symbol, "H1", version) + "metadata.json"
    meta = ModelMetadata.model_validate_json(store.get(key))
    meta = meta.model_copy(update={"labels": meta.labels.model_copy(update={"horizon": horizon})})
    data = meta.model_dump_json(indent=2).encode()
    store.put(key, data)
    return sha256_hex(data)


async def test_a_longer_horizon_still_settles_after_a_shorter_one_moved_on(
    database_url: str, store: ObjectStore, settings: TrainerSettings, bars: OHLCV
) -> None:
    """v1 (horizon 5) settles bars T..T+14 before v2 (horizon 20, in shadow) can settle bar T: the incremental
    scan still reaches back to it."""
    symbol = "SETLH"
    await register(database_url, store, symbol, "H1", "v1", write_model(store, symbol, "H1", "v1"))
    await register(
        database_url, store, symbol, "H1", "v2", _model_with_horizon(store, symbol, "v2", 20), status="candidate"
    )
    await ingest(database_url, symbol, Timeframe.H1, bars.window(0, T + 20))
    conn = await asyncpg.connect(database_url)
    try:
        for k in range(15):
            created = _at(bars, T + k) + timedelta(hours=1)
            await log_prediction(
                conn, symbol, int(bars.ts[T + k]), "v1", "production", [0.2, 0.3, 0.5], _window(0.01, k), created
            )
        await log_prediction(
            conn, symbol, int(bars.ts[T]), "v2", "shadow", [0.2, 0.3, 0.5], _window(0.01, 0), _at(bars, T)
        )
    finally:
        await conn.close()
    first = await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={symbol})
    assert first["settled"] == 15  # v1 on T..T+14 (T+14+5 = T+19 is stored); v2 waits for T+20
    await ingest(database_url, symbol, Timeframe.H1, bars.window(T + 20, T + 21))
    second = await asyncio.to_thread(run_settlement, settings=settings, store=store, symbols={symbol})
    assert second["settled"] == 1
    rows = [r for r in await _outcomes(database_url, symbol) if r["model_version"] == "v2"]
    assert [(r["t"], r["horizon"]) for r in rows] == [(int(bars.ts[T]), 20)]
    assert rows[0]["realised_log_return"] == pytest.approx(math.log(bars.close[T + 20] / bars.close[T]), abs=1e-12)
