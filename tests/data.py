"""Deterministic synthetic OHLCV for unit tests (seeded geometric random walk)."""

from __future__ import annotations

import numpy as np

from shared.timeframes import OHLCV, Timeframe


def generate_bars(timeframe: str, size: int, start: int = 1_600_000_000, seed: int = 42, price: float = 100.0) -> OHLCV:
    tf = Timeframe(timeframe)
    rng = np.random.default_rng(seed)
    t0 = int(tf.floor(np.array([start], dtype=np.int64))[0])
    ts = t0 + np.arange(size, dtype=np.int64) * tf.seconds
    r = rng.normal(0, 0.002 * np.sqrt(tf.seconds / 3600), size)
    close = price * np.exp(np.cumsum(r))
    open_ = np.r_[price, close[:-1]]
    spread = np.abs(rng.normal(0, 0.001, size)) * close
    high = np.maximum(open_, close) + spread
    low = np.minimum(open_, close) - spread * rng.uniform(0.2, 1.0, size)
    volume = rng.lognormal(8, 0.5, size).round()
    return OHLCV(ts, open_, high, low, close, volume)
