"""Feature drift (services/predictor/drift.py, shared/drift.py): one count per bar across requests and replicas,
PSI/KS over the window against thresholds calibrated on the training rows, feature_drift rows, gauges and the
retrain flag; a dead Redis never touches predictions.

Real PostgreSQL, Redis, indicators service and predictor apps. Models are the model factory's ONNX models
whose metadata carries reference distributions and null thresholds computed, as the trainer does, from their
training rows.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import REGISTRY
from scipy.stats import ks_2samp

from services.predictor.drift import (
    DriftMonitor,
    binned_ks,
    bins_of,
    min_live_bars,
    psi,
    window_bars,
    window_seconds,
)
from services.predictor.features_client import Rows
from services.predictor.main import create_app
from services.predictor.model_manager import ModelManager
from services.predictor.settings import PredictorSettings
from services.trainer.dataset import build_dataset, drift_window_bars, reference_distribution
from services.trainer.hyperparameters import TrainConfig
from shared import drift as rules
from shared.bars import bars_to_rows
from shared.cache import create_redis
from shared.features import FEATURE_NAMES, feature_rows
from shared.model_metadata import ModelMetadata, ReferenceDistribution, artifact_prefix
from shared.storage import ObjectStore, sha256_hex
from shared.timeframes import OHLCV, Timeframe
from shared.warmup import WARMUP_BARS
from tests.data import generate_bars
from tests.predictor.model_factory import feature_scaler, register, write_model
from tests.support.clients import asgi_client
from tests.support.keys import READ_KEY, WRITE_KEY
from tests.support.net import free_port
from tests.support.predictor import predictor_settings

Array = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
NO_CACHE = {"Cache-Control": "no-cache"}
TRAIN_BARS = 10_000
LIVE_BARS = 1440  # 24 h of M1 bars: the default window holds exactly these


def synthetic_bars(tf: Timeframe, size: int, end: int, seed: int, vol: Array | None = None) -> OHLCV:
    """tests/data.generate_bars' geometric random walk ending at the bar before `end`, with an optional
    volatility multiplier per bar (the planted shift)."""
    rng = np.random.default_rng(seed)
    ts = int(tf.floor(np.array([end], dtype=np.int64))[0]) - tf.seconds * np.arange(size, 0, -1, dtype=np.int64)
    m = np.ones(size) if vol is None else vol
    r = rng.normal(0, 0.002 * np.sqrt(tf.seconds / 3600), size) * m
    close = 100.0 * np.exp(np.cumsum(r))
    open_ = np.r_[100.0, close[:-1]]
    spread = np.abs(rng.normal(0, 0.001 * np.sqrt(tf.seconds / 3600), size)) * close * m
    high = np.maximum(open_, close) + spread
    low = np.minimum(open_, close) - spread * rng.uniform(0.2, 1.0, size)
    volume = rng.lognormal(8, 0.5, size).round()
    return OHLCV(ts, open_, high, low, close, volume)


def references(values: Array, tf: Timeframe | None = None) -> dict[str, ReferenceDistribution]:
    """The trainer's reference distributions (services/trainer/dataset.py, 10 quantile bins) with the null
    thresholds for the predictor's default window of `tf` (none without `tf`)."""
    window = None if tf is None else drift_window_bars(tf)
    return {name: reference_distribution(values[:, i], 10, window) for i, name in enumerate(FEATURE_NAMES)}


async def register_with_reference(
    database_url: str,
    store: ObjectStore,
    symbol: str,
    tf: str,
    train_rows: Array,
    version: str = "v1",
    *,
    calibrated: bool = True,
) -> None:
    mean, scale = feature_scaler(train_rows)
    write_model(store, symbol, tf, version, mean=mean, scale=scale)
    prefix = artifact_prefix(symbol, tf, version)
    meta = ModelMetadata.model_validate_json(store.get(prefix + "metadata.json"))
    meta.reference_distributions = references(train_rows, Timeframe(tf) if calibrated else None)
    body = meta.model_dump_json(indent=2).encode()
    store.put(prefix + "metadata.json", body)
    await register(database_url, store, symbol, tf, version, sha256_hex(body))


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3).upper()}"


# --- the statistics ---------------------------------------------------------------------------------------


def test_psi_is_zero_for_the_reference_and_grows_with_a_shift() -> None:
    ref = np.full(10, 0.1)
    assert psi(ref, ref) == pytest.approx(0.0)
    mild = np.r_[np.full(5, 0.09), np.full(5, 0.11)]
    strong = np.r_[np.full(5, 0.02), np.full(5, 0.18)]
    assert 0 < psi(mild, ref) < 0.25 < psi(strong, ref)
    # An empty live bin is floored, not infinite.
    empty = np.r_[0.0, np.full(9, 1 / 9)]
    assert np.isfinite(psi(empty, ref))


def test_binned_ks_is_a_lower_bound_of_the_exact_statistic() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(0, 1, 5000)
    ref = reference_distribution(train, 10)
    for shift in (0.0, 0.3, 1.0):
        live = rng.normal(shift, 1, 400)
        counts = np.bincount(bins_of(ref, live), minlength=len(ref.shares)) / len(live)
        exact = ks_2samp(live, train).statistic
        assert binned_ks(counts, np.asarray(ref.shares)) <= exact + 1e-12
    # and close to it with 10 bins when the shift is large
    assert binned_ks(counts, np.asarray(ref.shares)) > 0.8 * exact


def test_slow_timeframes_widen_the_window_to_the_last_n_bars() -> None:
    s = PredictorSettings(environment="test", drift_window_hours=24, drift_min_bars=50)
    assert window_seconds(Timeframe.M1, s) == 24 * 3600
    assert window_seconds(Timeframe.M15, s) == 24 * 3600  # 96 bars in 24 h
    assert window_seconds(Timeframe.H1, s) == 50 * 3600
    assert window_seconds(Timeframe.D1, s) == 50 * 86400
    assert min_live_bars(s) == 30
    # The trainer calibrates for the same window, from the rule both share.
    assert [window_bars(tf, s) for tf in (Timeframe.M1, Timeframe.M5, Timeframe.M15, Timeframe.H1)] == [
        1440,
        288,
        96,
        50,
    ]
    # The shared defaults (DRIFT_MIN_BARS 100): M15's 96 bars of 24 h widen to 100 bars.
    assert [drift_window_bars(tf) for tf in (Timeframe.M1, Timeframe.M5, Timeframe.M15, Timeframe.H1)] == [
        1440,
        288,
        100,
        100,
    ]


# --- calibrated thresholds ------------------------------------------------------------------------------


def window_stats(rows: Array, refs: dict[str, ReferenceDistribution], window: int, starts: Ints) -> tuple[Array, Array]:
    """PSI and KS (windows, features) of rows[s : s + window] against each reference, as the check computes them."""
    p = np.zeros((len(starts), len(FEATURE_NAMES)))
    k = np.zeros_like(p)
    for i, name in enumerate(FEATURE_NAMES):
        ref = refs[name]
        for j, s in enumerate(starts):
            live = np.bincount(bins_of(ref, rows[s : s + window, i]), minlength=len(ref.shares)) / window
            p[j, i], k[j, i] = psi(live, np.asarray(ref.shares)), binned_ks(live, np.asarray(ref.shares))
    return p, k


def flagged(p: Array, k: Array, refs: dict[str, ReferenceDistribution], bars: int) -> npt.NDArray[np.bool_]:
    """Which windows the check marks drifted: any feature over its (effective) threshold."""
    t = np.array([rules.effective_thresholds(refs[n], bars, 0.25, 0.3) for n in FEATURE_NAMES])
    return np.asarray(((p > t[:, 0]) | (k > t[:, 1])).any(axis=1))


def test_a_day_of_m5_bars_is_flagged_only_with_drift_under_calibrated_thresholds() -> None:
    """288-bar windows (M5, 24 h): the fixed PSI 0.25 marks nearly every driftless window drifted; the trainer's
    null thresholds mark almost none, and a volatility shift x3 over the window is still caught."""
    size = WARMUP_BARS + 20_000 + 12_000
    vol = np.ones(size)
    vol[-2000:] = 3.0  # the last 2,000 bars shifted, the 10,000 before them driftless live bars
    rows = feature_rows(synthetic_bars(Timeframe.M5, size, 1_800_000_000, seed=31, vol=vol)).values
    train, live, shifted = rows[:20_000], rows[20_000:-2000], rows[-1500:]  # 500 bars for the ATR to turn
    w = drift_window_bars(Timeframe.M5)
    calibrated, fixed = references(train, Timeframe.M5), references(train)
    assert all(r.null_window_bars == w and r.null_quantile == rules.NULL_QUANTILE for r in calibrated.values())
    hourly = np.arange(0, len(live) - w + 1, 12, dtype=np.int64)  # one check per hour
    p, k = window_stats(live, calibrated, w, hourly)
    assert flagged(p, k, fixed, w).mean() > 0.8  # 86 % of the hourly checks
    assert flagged(p, k, calibrated, w).mean() <= 0.01, flagged(p, k, calibrated, w).sum()
    sp, sk = window_stats(shifted, calibrated, w, np.arange(0, len(shifted) - w + 1, 12, dtype=np.int64))
    assert flagged(sp, sk, calibrated, w).all()


def test_null_thresholds_come_from_the_training_split_only() -> None:
    cfg = TrainConfig(horizon=3, min_sequences=300)
    bars = generate_bars("H1", 3000, seed=7)
    ds = build_dataset(bars, Timeframe.H1, Timeframe.H1, "SYN", cfg)
    atr = ds.reference["atr_14_pct"]
    assert atr.null_window_bars == 100 and atr.null_windows is not None and atr.null_windows >= rules.MIN_NULL_WINDOWS
    assert atr.psi_null is not None and atr.psi_null > 0.25  # 100 bars: far above the fixed threshold

    def changed_from(k: int) -> OHLCV:
        close = bars.close.copy()
        close[k:] *= np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.01, len(close) - k)))
        return OHLCV(bars.ts, bars.open, np.maximum(bars.high, close), np.minimum(bars.low, close), close, bars.volume)

    # Every bar from the first one validation reads changed: the null thresholds stay as they were.
    first_val = int(np.searchsorted(bars.ts, ds.val.ts[0])) - (cfg.sequence_length - 1)
    later = build_dataset(changed_from(first_val), Timeframe.H1, Timeframe.H1, "SYN", cfg)
    assert later.reference == ds.reference
    # The training rows changed: they move (the comparison above can fail).
    earlier = build_dataset(changed_from(first_val // 2), Timeframe.H1, Timeframe.H1, "SYN", cfg)
    assert earlier.reference["atr_14_pct"].psi_null != atr.psi_null


def test_null_thresholds_rescale_for_fewer_bars_and_old_metadata_keeps_the_fixed_ones() -> None:
    old = ReferenceDistribution.model_validate(
        {"edges": [0.0, 0.5, 1.0], "shares": [0.5, 0.5], "mean": 0.5, "std": 0.3}
    )
    assert old.psi_null is None and rules.effective_thresholds(old, 50, 0.25, 0.3) == (0.25, 0.3)
    ref = old.model_copy(update={"null_window_bars": 288, "psi_null": 1.5, "ks_null": 0.5})
    assert rules.effective_thresholds(ref, 288, 0.25, 0.3) == (1.5, 0.5)
    # Fewer bars counted: noisier, so higher thresholds (PSI ~ 1/n, KS ~ 1/sqrt(n)); more bars: kept.
    assert rules.effective_thresholds(ref, 144, 0.25, 0.3) == pytest.approx((3.0, 0.5 * 2**0.5))
    assert rules.effective_thresholds(ref, 1440, 0.25, 0.3) == (1.5, 0.5)
    assert rules.effective_thresholds(ref.model_copy(update={"psi_null": 0.1}), 288, 0.25, 0.3) == (0.25, 0.5)
    # Too few training rows for 8 windows: no null thresholds, the fixed ones apply.
    rng = np.random.default_rng(2)
    assert reference_distribution(rng.normal(0, 1, 3 * 288), 10, 288).psi_null is None


# --- the check on a planted shift -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def now() -> int:
    """A whole minute: the 24 h window [now - 24 h, now] then holds exactly the LIVE_BARS M1 bars before it."""
    return int(time.time()) // 60 * 60


@pytest.fixture(scope="module")
def m1_series(now: int) -> dict[str, tuple[Ints, Array]]:
    """Feature rows (ts, values) of the same M1 random walk: as generated, and with volatility x3 in the last
    24 h (the live part). The first TRAIN_BARS rows are the models' training rows."""
    size = WARMUP_BARS + TRAIN_BARS + LIVE_BARS
    out = {}
    for name, factor in (("steady", 1.0), ("shifted", 3.0)):
        vol = np.ones(size)
        vol[-LIVE_BARS:] = factor
        rows = feature_rows(synthetic_bars(Timeframe.M1, size, now, seed=21, vol=vol))
        out[name] = (rows.ts, rows.values)
    assert np.array_equal(out["steady"][1][:TRAIN_BARS], out["shifted"][1][:TRAIN_BARS])
    return out


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield p
    await p.close()


def observe_rows(monitor: DriftMonitor, symbol: str, ts: Ints, values: Array, timeframe: str = "M1") -> None:
    """Every live bar as the predictor sees it: one computed prediction per bar, newest row last."""
    for t, row in zip(ts, values, strict=True):
        iso = datetime.fromtimestamp(int(t), UTC).isoformat().replace("+00:00", "Z")
        monitor.observe(symbol, {timeframe: Rows([iso], list(FEATURE_NAMES), row[np.newaxis, :])})


MonitorOn = Callable[[str, Array, tuple[str, ...]], Awaitable[DriftMonitor]]


@pytest.fixture
def monitor_on(database_url: str, redis_url: str, store: ObjectStore, store_url: str, pool: asyncpg.Pool) -> MonitorOn:
    """`await monitor_on(timeframe, train, symbols)`: a drift monitor (its own Redis keys) over `symbols`, each
    served by a model whose reference distribution is `train`. The test closes its Redis client."""

    async def make(timeframe: str, train: Array, symbols: tuple[str, ...]) -> DriftMonitor:
        for sym in symbols:
            await register_with_reference(database_url, store, sym, timeframe, train)
        settings = predictor_settings(database_url, redis_url, "http://127.0.0.1:1", store_url)
        models = ModelManager(store, pool, database_url, 60)
        await models.refresh()
        redis = create_redis(settings, "drift-test")
        return DriftMonitor(settings, pool, redis, models, key_prefix=unique("drift-test-"))

    return make


async def test_planted_volatility_shift_is_flagged_and_steady_bars_are_not(
    monitor_on: MonitorOn,
    pool: asyncpg.Pool,
    now: int,
    m1_series: dict[str, tuple[Ints, Array]],
    client: httpx.AsyncClient,
) -> None:
    steady_sym, shifted_sym = unique("DRS"), unique("DRV")
    train = m1_series["steady"][1][:TRAIN_BARS]
    monitor = await monitor_on("M1", train, (steady_sym, shifted_sym))
    for sym, name in ((steady_sym, "steady"), (shifted_sym, "shifted")):
        ts, values = m1_series[name]
        observe_rows(monitor, sym, ts[TRAIN_BARS:], values[TRAIN_BARS:])
    assert await monitor.flush(now=now) == 2 * LIVE_BARS
    results = {r.symbol: r for r in await monitor.check(now=now)}

    shifted, steady = results[shifted_sym], results[steady_sym]
    assert shifted.status == steady.status == "checked"
    assert shifted.live_bars == steady.live_bars == LIVE_BARS
    drifted = {f.feature: f for f in shifted.drifted}
    assert {"atr_14_pct", "bb_bandwidth"} <= set(drifted), drifted
    assert drifted["atr_14_pct"].psi > 1.0
    assert steady.drifted == [], steady.features
    assert max(f.psi for f in steady.features) < 0.25

    rows = await pool.fetch(
        "SELECT symbol, feature, psi, ks, live_bars, drifted FROM feature_drift WHERE symbol = ANY($1::text[])",
        [steady_sym, shifted_sym],
    )
    assert len(rows) == 2 * len(FEATURE_NAMES)
    by = {(r["symbol"], r["feature"]): r for r in rows}
    assert by[(shifted_sym, "atr_14_pct")]["drifted"] and not by[(steady_sym, "atr_14_pct")]["drifted"]
    assert by[(shifted_sym, "atr_14_pct")]["live_bars"] == LIVE_BARS

    flags = {
        r["symbol"]: r
        for r in await pool.fetch(
            "SELECT symbol, drift, reason FROM model_flags WHERE symbol = ANY($1::text[])", [steady_sym, shifted_sym]
        )
    }
    assert steady_sym not in flags
    assert flags[shifted_sym]["drift"] is True
    assert "atr_14_pct" in flags[shifted_sym]["reason"]

    def gauge(symbol: str) -> float:
        value = REGISTRY.get_sample_value(
            "ml_feature_drift", {"symbol": symbol, "timeframe": "M1", "feature": "atr_14_pct"}
        )
        assert value is not None, f"no ml_feature_drift sample for {symbol}"
        return value

    assert gauge(shifted_sym) > 1.0
    assert gauge(steady_sym) < 0.25

    # GET /v1/drift serves the same check, largest PSI first, with the flag.
    r = await client.get("/v1/drift", params={"symbol": shifted_sym, "timeframe": "M1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["live_bars"] == LIVE_BARS and len(body["features"]) == len(FEATURE_NAMES)
    assert set(body["drifted_features"]) == set(drifted)
    assert body["features"][0]["psi"] == max(f.psi for f in shifted.features)
    assert body["flag"]["drift"] is True and "atr_14_pct" in body["flag"]["reason"]
    r = await client.get("/v1/drift", params={"symbol": steady_sym, "timeframe": "M1"})
    assert r.status_code == 200 and r.json()["drifted_features"] == [] and r.json()["flag"] is None, r.text
    r = await client.get("/v1/drift", params={"symbol": unique("DRN"), "timeframe": "M1"})
    assert r.status_code == 404 and "no drift check stored" in r.json()["detail"], r.text

    # A later check never clears the flag (promotion does), even when it finds nothing.
    later = await monitor.check(now=now + 2 * 86400)
    assert {r.symbol: r.status for r in later}[shifted_sym] == "insufficient"
    assert await pool.fetchval("SELECT drift FROM model_flags WHERE symbol = $1", shifted_sym) is True
    assert monitor.redis is not None
    await monitor.redis.aclose()


async def test_a_shift_that_began_seven_hours_ago_shows_in_the_next_check(
    monitor_on: MonitorOn, now: int, m1_series: dict[str, tuple[Ints, Array]]
) -> None:
    """The last 7 of the 24 h shifted (volatility x3 since 7 h): under 30 % of the window is enough. (The fixed
    threshold caught it at 6 h; the calibrated ones, higher for the slow features, at 7 h, bb_bandwidth first.)"""
    sym = unique("DRP")
    steady_ts, steady = m1_series["steady"]
    _, shifted = m1_series["shifted"]
    # Same walk: the steady bars until 7 h ago, then the shifted generator's rows (their ATR already x3 after
    # 14 bars, as it would be live).
    live = np.vstack([steady[TRAIN_BARS:-420], shifted[-420:]])
    monitor = await monitor_on("M1", steady[:TRAIN_BARS], (sym,))
    observe_rows(monitor, sym, steady_ts[TRAIN_BARS:], live)
    await monitor.flush(now=now)
    (result,) = [r for r in await monitor.check(now=now) if r.symbol == sym]
    assert "bb_bandwidth" in {f.feature for f in result.drifted}
    assert monitor.redis is not None
    await monitor.redis.aclose()


async def test_the_check_on_a_day_of_m5_bars_flags_the_shift_and_not_the_steady_series(
    monitor_on: MonitorOn, pool: asyncpg.Pool
) -> None:
    """Through the monitor (Redis counts, PostgreSQL rows and flags): 288 M5 bars, where the fixed PSI 0.25 alone
    marked the steady series drifted; its null thresholds do not, and the shifted series is still flagged."""
    now = int(time.time()) // 300 * 300  # the 24 h window then holds exactly 288 M5 bars
    size = WARMUP_BARS + 20_000 + 288
    series = {}
    for name, factor in (("steady", 1.0), ("shifted", 3.0)):
        vol = np.ones(size)
        vol[-288:] = factor
        rows = feature_rows(synthetic_bars(Timeframe.M5, size, now, seed=33, vol=vol))
        series[name] = (rows.ts, rows.values)
    train = series["steady"][1][:20_000]
    steady_sym, shifted_sym = unique("DMS"), unique("DMV")
    monitor = await monitor_on("M5", train, (steady_sym, shifted_sym))
    for sym, name in ((steady_sym, "steady"), (shifted_sym, "shifted")):
        ts, values = series[name]
        observe_rows(monitor, sym, ts[-288:], values[-288:], "M5")
    assert await monitor.flush(now=now) == 2 * 288
    results = {r.symbol: r for r in await monitor.check(now=now)}
    steady, shifted = results[steady_sym], results[shifted_sym]
    assert steady.live_bars == shifted.live_bars == 288
    # The fixed threshold alone would have flagged the steady series; the calibrated ones do not.
    assert max(f.psi for f in steady.features) > 0.25
    assert steady.drifted == [], steady.drifted
    assert "atr_14_pct" in {f.feature for f in shifted.drifted}
    reason = await pool.fetchval("SELECT reason FROM model_flags WHERE symbol = $1", shifted_sym)
    assert "atr_14_pct (PSI" in reason and " of " in reason
    assert await pool.fetchval("SELECT count(*) FROM model_flags WHERE symbol = $1", steady_sym) == 0
    assert monitor.redis is not None
    await monitor.redis.aclose()


# --- counting through the predictor ---------------------------------------------------------------------


async def ingest(indicators_url: str, symbol: str, bars: OHLCV) -> None:
    async with httpx.AsyncClient(base_url=indicators_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
        r = await c.post(f"/v1/bars/{symbol}/M5", json={"bars": bars_to_rows(bars)})
        assert r.status_code == 200, r.text


@pytest.fixture
async def m5_symbol(database_url: str, indicators_url: str, store: ObjectStore) -> tuple[str, OHLCV]:
    """A symbol with 700 M5 bars ending at the last completed bar (the 701st held back) and a model."""
    sym = unique("DRC")
    bars = synthetic_bars(Timeframe.M5, 701, int(time.time()), seed=5)
    head = bars.window(None, -1)
    await ingest(indicators_url, sym, head)
    await register_with_reference(database_url, store, sym, "M5", feature_rows(head).values)
    return sym, bars


def app_settings(database_url: str, redis_url: str, indicators_url: str, store_url: str) -> PredictorSettings:
    return predictor_settings(
        database_url, redis_url, indicators_url, store_url, drift_flush_seconds=0.1, cache_l1_entries=0
    )


async def counted(monitor: DriftMonitor, symbol: str) -> int:
    n, _counts, _start = await monitor.live_counts(symbol, "M5", "v1", time.time())
    return n


async def wait_models(*monitors: DriftMonitor, symbol: str) -> None:
    for _ in range(100):
        if all(m.models.get(symbol, "M5") is not None for m in monitors):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{symbol} M5 model not loaded")


async def test_one_count_per_bar_across_requests_and_two_predictors(
    database_url: str, redis_url: str, indicators_url: str, store_url: str, m5_symbol: tuple[str, OHLCV]
) -> None:
    sym, bars = m5_symbol
    settings = app_settings(database_url, redis_url, indicators_url, store_url)
    app1, app2 = create_app(settings), create_app(settings)
    async for c1 in asgi_client(app1, READ_KEY):
        async for c2 in asgi_client(app2, READ_KEY):
            m1, m2 = app1.state.predictor.drift, app2.state.predictor.drift
            await wait_models(m1, m2, symbol=sym)
            body = {"symbol": sym, "timeframe": "M5"}
            for c in (c1, c2, c1, c2, c1, c2):
                r = await c.post("/v1/predictions", json=body, headers=NO_CACHE)
                assert r.status_code == 200, r.text
            # Each process queued the bar once however many requests computed it.
            assert m1.pending <= 1 and m2.pending <= 1
            await asyncio.sleep(0.5)  # two flush intervals
            assert await counted(m1, sym) == 1
            # The next bar arrives: one more count, again only once across both processes.
            await ingest(indicators_url, sym, bars.tail(1))
            await asyncio.sleep(0.3)  # the series stamp moves on by NOTIFY
            for c in (c2, c1, c2, c1):
                r = await c.post("/v1/predictions", json=body, headers=NO_CACHE)
                assert r.status_code == 200, r.text
            await asyncio.sleep(0.5)
            assert await counted(m1, sym) == 2
            assert await counted(m2, sym) == 2


async def test_redis_down_predictions_still_served_and_counts_kept(
    database_url: str, indicators_url: str, store_url: str, m5_symbol: tuple[str, OHLCV]
) -> None:
    sym, _bars = m5_symbol
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(app_settings(database_url, dead, indicators_url, store_url))
    async for c in asgi_client(app, READ_KEY):
        monitor = app.state.predictor.drift
        await wait_models(monitor, symbol=sym)
        for _ in range(3):
            r = await c.post("/v1/predictions", json={"symbol": sym, "timeframe": "M5"}, headers=NO_CACHE)
            assert r.status_code == 200, r.text
        await asyncio.sleep(0.3)  # flushes fail meanwhile
        assert monitor.pending == 1  # kept in memory for when Redis returns
        assert monitor.last_error is not None


async def test_one_replica_checks_per_interval_and_history_is_not_counted(
    database_url: str, redis_url: str, store: ObjectStore, store_url: str, pool: asyncpg.Pool, now: int
) -> None:
    sym = unique("DRL")
    rows = feature_rows(synthetic_bars(Timeframe.M1, WARMUP_BARS + 600, now, seed=8))
    await register_with_reference(database_url, store, sym, "M1", rows.values)
    settings = predictor_settings(database_url, redis_url, "http://127.0.0.1:1", store_url)
    models = ModelManager(store, pool, database_url, 60)
    await models.refresh()
    redis = create_redis(settings, "drift-test")
    prefix = unique("drift-test-")
    a, b = (DriftMonitor(settings, pool, redis, models, key_prefix=prefix) for _ in range(2))
    # Replicas share the lock: one checks, the other skips until the interval has passed.
    first, second = await a.try_check(), await b.try_check()
    assert (first is None) != (second is None)
    # A client replaying bars from three days ago (outside every window) adds nothing; today's bars do.
    old = rows.ts - 3 * 86400
    observe_rows(a, sym, old[-5:], rows.values[-5:])
    assert await a.flush(now=now) == 0
    observe_rows(a, sym, rows.ts[-5:], rows.values[-5:])
    assert await a.flush(now=now) == 5
    assert redis is not None
    await redis.aclose()


async def test_the_drift_flag_keeps_a_performance_reason(pool: asyncpg.Pool) -> None:
    from services.predictor import repository

    sym = unique("DRF")
    await pool.execute(
        "INSERT INTO model_flags (symbol, timeframe, performance, reason) VALUES ($1, 'H1', true, $2)",
        sym,
        "performance: live hit rate 0.41 below validation 0.55",
    )
    async with pool.acquire() as conn:
        await repository.flag_drift(conn, sym, "H1", "drift: atr_14_pct (PSI 0.900, KS 0.400)")
        await repository.flag_drift(conn, sym, "H1", "drift: rsi_14 (PSI 0.300, KS 0.100)")
    row = await pool.fetchrow("SELECT drift, performance, reason FROM model_flags WHERE symbol = $1", sym)
    assert row["drift"] and row["performance"]
    assert row["reason"] == "performance: live hit rate 0.41 below validation 0.55; drift: rsi_14 (PSI 0.300, KS 0.100)"
