"""Data-quality flags for valid but suspicious bars: kept and flagged, never rejected."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

from shared.timeframes import OHLCV, Timeframe

FLAG_MOVE = 1
FLAG_GAP = 2
FLAG_REASONS = {FLAG_MOVE: "move", FLAG_GAP: "gap"}

# A series gap is flagged when more than this many bar intervals pass without a bar. Five leaves weekends
# and one-day holidays on daily equity bars alone; intraday weekends are flagged (they are gaps).
GAP_BARS = 5


def quality_flags(
    context: OHLCV, bars: OHLCV, timeframe: Timeframe, sigma: float, window: int
) -> npt.NDArray[np.int16]:
    """Flags for `bars`, given up to `window` stored bars just before them (`context`).

    move: |log return| above `sigma` standard deviations of the previous `window` log returns (needs at
    least window/2 of them); gap: more than GAP_BARS intervals since the previous bar.
    """
    ts = np.concatenate([context.ts, bars.ts])
    close = np.concatenate([context.close, bars.close])
    k = len(context)
    flags = np.zeros(len(bars), dtype=np.int16)
    if ts.size < 2:
        return flags
    r = pd.Series(np.diff(np.log(close)))
    prior_sd = r.rolling(window, min_periods=max(window // 2, 2)).std().shift(1).to_numpy()
    with np.errstate(invalid="ignore"):
        big = np.abs(r.to_numpy()) > sigma * prior_sd  # NaN compares False: too little history, no flag
    moves = np.r_[False, big][k:]
    gaps = np.r_[False, np.diff(ts) > GAP_BARS * timeframe.seconds][k:]
    flags[moves] |= FLAG_MOVE
    flags[gaps] |= FLAG_GAP
    return flags
