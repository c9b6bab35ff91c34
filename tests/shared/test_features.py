"""The 17 features against TA-Lib's own functions and pandas-ta's outputs on real data; no look-ahead;
history independence; scale independence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandas_ta as ta
import pytest
import talib

from shared.features import FEATURE_NAMES, N_FEATURES, compute_features, feature_rows
from shared.timeframes import OHLCV, Timeframe, resample
from shared.warmup import WARMUP_BARS

RTOL = 1e-9


def _col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def _talib_reference(b: OHLCV) -> dict[str, np.ndarray]:
    h, lo, c, v = b.high, b.low, b.close, b.volume
    macd, sig, hist = talib.MACD(c, fastperiod=12, slowperiod=26, signalperiod=9)
    up, mid, low = talib.BBANDS(c, timeperiod=20, nbdevup=2, nbdevdn=2, matype=0)
    k, d = talib.STOCH(h, lo, c, fastk_period=14, slowk_period=3, slowk_matype=0, slowd_period=3, slowd_matype=0)
    return {
        "rsi_14": talib.RSI(c, timeperiod=14),
        "macd_line": macd / c,
        "macd_signal": sig / c,
        "macd_hist": hist / c,
        "bb_percent_b": (c - low) / (up - low),
        "bb_bandwidth": (up - low) / mid,
        "sma20_dist": c / talib.SMA(c, timeperiod=20) - 1,
        "sma50_dist": c / talib.SMA(c, timeperiod=50) - 1,
        "atr_14_pct": talib.ATR(h, lo, c, timeperiod=14) / c,
        "stoch_k": k,
        "stoch_d": d,
        "adx_14": talib.ADX(h, lo, c, timeperiod=14),
        "cci_20": talib.CCI(h, lo, c, timeperiod=20),
        "willr_14": talib.WILLR(h, lo, c, timeperiod=14),
        "mfi_14": talib.MFI(h, lo, c, v, timeperiod=14),
        "roc_10": talib.ROC(c, timeperiod=10),
        # TA-Lib's OBV starts at volume[0]; the slope of a line does not depend on its offset.
        "obv_slope_20": talib.LINEARREG_SLOPE(talib.OBV(c, v), timeperiod=20) / talib.SMA(v, timeperiod=20),
    }


def test_there_are_exactly_17_named_features() -> None:
    assert N_FEATURES == 17
    assert len(set(FEATURE_NAMES)) == 17


def test_every_feature_equals_talib_on_real_data(sp500: OHLCV) -> None:
    ours = compute_features(sp500)
    ref = _talib_reference(sp500)
    assert set(ref) == set(FEATURE_NAMES)
    for name, expected in ref.items():
        got = ours[:, _col(name)]
        # Same lookback: NaN exactly where TA-Lib has no value yet.
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=name)
        ok = ~np.isnan(expected)
        np.testing.assert_allclose(got[ok], expected[ok], rtol=RTOL, atol=1e-12, err_msg=name)


def test_every_feature_equals_pandas_ta_on_real_data(sp500: OHLCV) -> None:
    df = pd.DataFrame({"high": sp500.high, "low": sp500.low, "close": sp500.close, "volume": sp500.volume})
    c = df["close"]
    macd = ta.macd(c, 12, 26, 9, talib=True)
    bb = ta.bbands(c, length=20, lower_std=2.0, upper_std=2.0, talib=True)
    st = ta.stoch(df["high"], df["low"], c, k=14, d=3, smooth_k=3, talib=True)
    obv = ta.obv(c, df["volume"], talib=True)
    ref = {
        "rsi_14": ta.rsi(c, 14, talib=True),
        "macd_line": macd["MACD_12_26_9"] / c,
        "macd_signal": macd["MACDs_12_26_9"] / c,
        "macd_hist": macd["MACDh_12_26_9"] / c,
        "bb_percent_b": bb["BBP_20_2.0_2.0"],
        "bb_bandwidth": bb["BBB_20_2.0_2.0"] / 100.0,  # pandas-ta reports bandwidth in percent
        "sma20_dist": c / ta.sma(c, 20, talib=True) - 1,
        "sma50_dist": c / ta.sma(c, 50, talib=True) - 1,
        "atr_14_pct": ta.atr(df["high"], df["low"], c, 14, talib=True) / c,
        "stoch_k": st["STOCHk_14_3_3"],
        "stoch_d": st["STOCHd_14_3_3"],
        "adx_14": ta.adx(df["high"], df["low"], c, 14, talib=True)["ADX_14"],
        "cci_20": ta.cci(df["high"], df["low"], c, 20, talib=True),
        "willr_14": ta.willr(df["high"], df["low"], c, 14, talib=True),
        "mfi_14": ta.mfi(df["high"], df["low"], c, df["volume"], 14, talib=True),
        "roc_10": ta.roc(c, 10, talib=True),
        "obv_slope_20": ta.linreg(obv, 20, slope=True, talib=True) / ta.sma(df["volume"], 20, talib=True),
    }
    rows = compute_features(sp500)[WARMUP_BARS:]
    for name, series in ref.items():
        expected = np.asarray(series, dtype=np.float64)[WARMUP_BARS:]
        np.testing.assert_allclose(rows[:, _col(name)], expected, rtol=1e-7, atol=1e-10, err_msg=name)


def test_latest_row_does_not_depend_on_history_length(sp500: OHLCV) -> None:
    full = compute_features(sp500)
    for end in range(WARMUP_BARS + 1, len(sp500), 211):
        window = sp500.window(end - WARMUP_BARS - 1, end)
        last = feature_rows(window).values[-1]
        np.testing.assert_allclose(last, full[end - 1], rtol=RTOL, atol=0, err_msg=f"row {end - 1}")


def _perturb_after(b: OHLCV, cutoff_ts: int, seed: int = 7) -> OHLCV:
    """Every bar at or after `cutoff_ts` replaced by a different, still valid bar."""
    rng = np.random.default_rng(seed)
    k = int(np.searchsorted(b.ts, cutoff_ts))
    scale = rng.uniform(0.5, 2.0, len(b) - k)
    o, h, lo, c, v = (x.copy() for x in (b.open, b.high, b.low, b.close, b.volume))
    c[k:] *= scale
    o[k:] *= scale[::-1]
    h[k:] = np.maximum(o[k:], c[k:]) * 1.01
    lo[k:] = np.minimum(o[k:], c[k:]) * 0.99
    v[k:] = v[k:] * rng.uniform(0, 3, len(b) - k)
    return OHLCV(b.ts.copy(), o, h, lo, c, v)


def test_changing_the_future_leaves_the_past_unchanged_on_the_base_timeframe(sp500: OHLCV) -> None:
    cutoff = int(sp500.ts[3000])
    changed = _perturb_after(sp500, cutoff)
    a, b = feature_rows(sp500), feature_rows(changed)
    closed = a.ts + Timeframe.D1.seconds <= cutoff
    np.testing.assert_array_equal(a.values[closed], b.values[: int(closed.sum())])
    # and the change did reach the rows after the cutoff
    assert not np.allclose(a.values[~closed][:5], b.values[int(closed.sum()) :][:5])


@pytest.mark.parametrize(("base", "target"), [("H1", "H4"), ("H1", "D1"), ("D1", "W1")])
def test_changing_the_future_leaves_resampled_rows_unchanged(
    hourly: OHLCV, sp500: OHLCV, base: str, target: str
) -> None:
    bars = sp500 if base == "D1" else _long_hourly(hourly)
    btf, ttf = Timeframe(base), Timeframe(target)
    # cut in the middle of a target bar, so the target bar containing the cutoff is still forming
    cutoff = int(ttf.floor(bars.ts[len(bars) * 3 // 4 : len(bars) * 3 // 4 + 1])[0]) + btf.seconds * 2
    changed = _perturb_after(bars, cutoff)
    a = feature_rows(resample(bars, btf, ttf))
    b = feature_rows(resample(changed, btf, ttf))
    closed_a = a.ts + ttf.seconds <= cutoff
    closed_b = b.ts + ttf.seconds <= cutoff
    assert closed_a.sum() > 10
    np.testing.assert_array_equal(a.ts[closed_a], b.ts[closed_b])
    np.testing.assert_array_equal(a.values[closed_a], b.values[closed_b])
    # the target bar containing the cutoff did change: the comparison above is not vacuous
    after = ~closed_a
    assert not np.array_equal(a.values[after][:3], b.values[~closed_b][:3])


def _long_hourly(hourly: OHLCV) -> OHLCV:
    from tests.data import generate_bars

    return generate_bars("H1", 24 * (WARMUP_BARS + 200), seed=3)


def test_features_do_not_depend_on_price_level_or_volume_units(sp500: OHLCV) -> None:
    scaled = OHLCV(
        sp500.ts, sp500.open * 1000, sp500.high * 1000, sp500.low * 1000, sp500.close * 1000, sp500.volume / 100
    )
    np.testing.assert_allclose(feature_rows(scaled).values, feature_rows(sp500).values, rtol=1e-6, atol=1e-8)


def test_warm_up_rows_are_left_out_and_no_value_is_missing(sp500: OHLCV) -> None:
    rows = feature_rows(sp500)
    assert len(rows) == len(sp500) - WARMUP_BARS
    assert rows.ts[0] == sp500.ts[WARMUP_BARS]
    assert np.isfinite(rows.values).all()


def test_flat_prices_give_defined_values() -> None:
    n = WARMUP_BARS + 50
    ts = np.arange(n, dtype=np.int64) * 3600
    one = np.ones(n)
    rows = feature_rows(OHLCV(ts, one, one, one, one, np.zeros(n)))
    # every row of a flat, volume-less series is either defined or dropped; never NaN
    assert np.isfinite(rows.values).all()
