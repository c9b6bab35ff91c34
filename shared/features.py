"""The 17 indicator features: defined once, used by the indicators service and by training.

pandas-ta defines these indicators and, with TA-Lib installed, delegates each of them to a TA-Lib kernel.
This module calls those same kernels directly on contiguous float64 arrays: pandas-ta's per-call Series
validation and naming cost 20-50x the computation on short windows (see docs/BENCHMARKS.md), and the
real-time path computes short windows. The test suite holds every feature to pandas-ta's own output and to
TA-Lib's functions on real data, so the definitions cannot drift from the library's.

Every feature is scale-free (a ratio, an oscillator or a price-normalised difference), so a model trained
at one price level works at another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import talib

from shared.timeframes import OHLCV
from shared.warmup import WARMUP_BARS

FloatArray = npt.NDArray[np.float64]
_SMA = talib.MA_Type.SMA  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    description: str
    formula: str
    parameters: dict[str, float | int] = field(default_factory=dict)
    # Bars before the first defined value (TA-Lib's lookback).
    lookback_bars: int = 0


FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        "rsi_14",
        "Relative Strength Index (Wilder)",
        "100 - 100 / (1 + RMA(gain,14) / RMA(loss,14))",
        {"length": 14},
        14,
    ),
    FeatureSpec(
        "macd_line",
        "MACD line divided by close",
        "(EMA(close,12) - EMA(close,26)) / close",
        {"fast": 12, "slow": 26},
        33,
    ),
    FeatureSpec(
        "macd_signal",
        "MACD signal line divided by close",
        "EMA(MACD,9) / close",
        {"fast": 12, "slow": 26, "signal": 9},
        33,
    ),
    FeatureSpec(
        "macd_hist",
        "MACD histogram divided by close",
        "(MACD - signal) / close",
        {"fast": 12, "slow": 26, "signal": 9},
        33,
    ),
    FeatureSpec(
        "bb_percent_b",
        "Bollinger %B: position of close inside the bands (0.5 when the bands are flat)",
        "(close - lower) / (upper - lower), bands SMA(20) +/- 2 population std",
        {"length": 20, "std": 2},
        19,
    ),
    FeatureSpec("bb_bandwidth", "Bollinger bandwidth", "(upper - lower) / middle", {"length": 20, "std": 2}, 19),
    FeatureSpec(
        "sma20_dist", "Distance of close to its 20-bar simple average", "close / SMA(close,20) - 1", {"length": 20}, 19
    ),
    FeatureSpec(
        "sma50_dist", "Distance of close to its 50-bar simple average", "close / SMA(close,50) - 1", {"length": 50}, 49
    ),
    FeatureSpec(
        "atr_14_pct", "Average True Range (Wilder) as a fraction of close", "ATR(14) / close", {"length": 14}, 14
    ),
    FeatureSpec(
        "stoch_k", "Slow stochastic %K", "SMA(100 * (close - LL14) / (HH14 - LL14), 3)", {"k": 14, "smooth_k": 3}, 15
    ),
    FeatureSpec("stoch_d", "Slow stochastic %D", "SMA(%K, 3)", {"k": 14, "smooth_k": 3, "d": 3}, 17),
    FeatureSpec(
        "adx_14",
        "Average Directional Index (Wilder)",
        "RMA(DX,14), DX = 100 |+DI - -DI| / (+DI + -DI)",
        {"length": 14},
        27,
    ),
    FeatureSpec(
        "cci_20", "Commodity Channel Index", "(TP - SMA(TP,20)) / (0.015 * meandev(TP,20))", {"length": 20}, 19
    ),
    FeatureSpec("willr_14", "Williams %R", "-100 * (HH14 - close) / (HH14 - LL14)", {"length": 14}, 13),
    FeatureSpec("mfi_14", "Money Flow Index", "100 - 100 / (1 + sum(+MF,14) / sum(-MF,14))", {"length": 14}, 14),
    FeatureSpec("roc_10", "Rate of change in percent", "100 * (close / close[-10] - 1)", {"length": 10}, 10),
    FeatureSpec(
        "obv_slope_20",
        "Slope of On-Balance Volume over 20 bars, in units of mean volume",
        "LINEARREG_SLOPE(OBV,20) / SMA(volume,20) (0 when volume is 0)",
        {"length": 20},
        19,
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
N_FEATURES = len(FEATURE_NAMES)

# The warm-up (rows never returned): see shared/warmup.py.


def compute_features(bars: OHLCV) -> FloatArray:
    """The (len(bars), 17) feature matrix; NaN where a feature is still inside TA-Lib's lookback.

    Row i uses bars[0..i] only: every kernel is causal.
    """
    # bars.open enters no feature; it is kept in bars for resampling and storage.
    h = np.ascontiguousarray(bars.high, dtype=np.float64)
    lo = np.ascontiguousarray(bars.low, dtype=np.float64)
    c = np.ascontiguousarray(bars.close, dtype=np.float64)
    v = np.ascontiguousarray(bars.volume, dtype=np.float64)
    n = c.shape[0]
    # Feature-major while filling (each kernel writes one contiguous row), returned as its (n, 17) transpose.
    out = np.empty((N_FEATURES, n), dtype=np.float64)
    if n == 0:
        return out.T

    with np.errstate(divide="ignore", invalid="ignore"):
        out[0] = talib.RSI(c, 14)
        macd, signal, hist = talib.MACD(c, 12, 26, 9)
        np.divide(macd, c, out=out[1])
        np.divide(signal, c, out=out[2])
        np.divide(hist, c, out=out[3])
        upper, middle, lower = talib.BBANDS(c, 20, 2.0, 2.0, _SMA)
        width = np.subtract(upper, lower, out=upper)
        np.divide(np.subtract(c, lower, out=lower), width, out=out[4])
        out[4][width == 0] = 0.5  # flat bands: the close sits in the middle
        np.divide(width, middle, out=out[5])
        np.divide(c, middle, out=out[6])
        out[6] -= 1.0
        np.divide(c, talib.SMA(c, 50), out=out[7])
        out[7] -= 1.0
        np.divide(talib.ATR(h, lo, c, 14), c, out=out[8])
        out[9], out[10] = talib.STOCH(h, lo, c, 14, 3, _SMA, 3, _SMA)
        out[11] = talib.ADX(h, lo, c, 14)
        out[12] = talib.CCI(h, lo, c, 20)
        out[13] = talib.WILLR(h, lo, c, 14)
        out[14] = talib.MFI(h, lo, c, v, 14)
        out[15] = talib.ROC(c, 10)
        mean_volume = talib.SMA(v, 20)
        np.divide(talib.LINEARREG_SLOPE(_obv(c, v), 20), mean_volume, out=out[16])
        out[16][mean_volume == 0] = 0.0  # no volume, no flow
    return out.T


def _obv(close: FloatArray, volume: FloatArray) -> FloatArray:
    """On-Balance Volume counted from the first bar of the window.

    TA-Lib's OBV starts at volume[0]; only differences of OBV enter the slope, so the start value cancels.
    Summing signed volume with the first term at zero keeps the magnitudes small, so the slope of a window
    equals the slope of the same bars inside a longer history to float precision.
    """
    signed = np.sign(np.diff(close)) * volume[1:]
    obv = np.empty_like(close)
    obv[0] = 0.0
    np.cumsum(signed, out=obv[1:])
    return obv


@dataclass(frozen=True)
class FeatureRows:
    """Feature rows that passed warm-up: `ts` bar-open epoch seconds, `values` (rows, 17)."""

    ts: npt.NDArray[np.int64]
    values: FloatArray

    def __len__(self) -> int:
        return int(self.ts.shape[0])


def feature_rows(bars: OHLCV, warmup: int = WARMUP_BARS) -> FeatureRows:
    """Rows from index `warmup` on, with any non-finite row (degenerate input) left out."""
    matrix = np.ascontiguousarray(compute_features(bars)[warmup:])
    ts = bars.ts[warmup:]
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        matrix, ts = matrix[finite], ts[finite]
    return FeatureRows(ts=ts, values=matrix)


def catalog() -> list[dict[str, object]]:
    return [
        {
            "name": f.name,
            "description": f.description,
            "formula": f.formula,
            "parameters": f.parameters,
            "lookback_bars": f.lookback_bars,
            "warmup_bars": WARMUP_BARS,
        }
        for f in FEATURES
    ]
