"""Timeframes, symbol rules and resampling of bars to a higher timeframe (completed bars only)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

SYMBOL_RE = re.compile(r"^[A-Z0-9._-]{1,20}$")

# 1970-01-01 was a Thursday; weekly bars open on Monday 00:00 UTC, 4 days later.
_WEEK_ANCHOR_S = 4 * 86_400


class Timeframe(StrEnum):
    M1 = "M1"
    M5 = "M5"
    M15 = "M15"
    M30 = "M30"
    H1 = "H1"
    H4 = "H4"
    D1 = "D1"
    W1 = "W1"

    @property
    def seconds(self) -> int:
        return _SECONDS[self]

    def floor(self, epoch_s: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Open time of the bar of this timeframe that contains each timestamp (UTC epoch seconds)."""
        step = self.seconds
        anchor = _WEEK_ANCHOR_S if self is Timeframe.W1 else 0
        return ((epoch_s - anchor) // step) * step + anchor

    def is_aligned(self, epoch_s: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return np.asarray(self.floor(epoch_s) == epoch_s)


_SECONDS = {
    Timeframe.M1: 60,
    Timeframe.M5: 300,
    Timeframe.M15: 900,
    Timeframe.M30: 1800,
    Timeframe.H1: 3600,
    Timeframe.H4: 14_400,
    Timeframe.D1: 86_400,
    Timeframe.W1: 604_800,
}

TIMEFRAMES = tuple(Timeframe)


def parse_timeframe(value: str) -> Timeframe:
    try:
        return Timeframe(value)
    except ValueError:
        from shared.errors import ValidationFailed

        raise ValidationFailed(
            f"unknown timeframe {value!r}; expected one of {', '.join(t.value for t in TIMEFRAMES)}"
        ) from None


def check_symbol(symbol: str) -> str:
    if not SYMBOL_RE.fullmatch(symbol):  # `match` with `$` would let a trailing newline through
        from shared.errors import ValidationFailed

        raise ValidationFailed(f"bad symbol {symbol!r}: must match {SYMBOL_RE.pattern}")
    return symbol


@dataclass(frozen=True)
class OHLCV:
    """Columnar bars: `ts` is the bar-open time in UTC epoch seconds, ascending and unique."""

    ts: npt.NDArray[np.int64]
    open: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    close: npt.NDArray[np.float64]
    volume: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def window(self, start: int | None, stop: int | None) -> OHLCV:
        s = slice(start, stop)
        return OHLCV(self.ts[s], self.open[s], self.high[s], self.low[s], self.close[s], self.volume[s])

    def tail(self, n: int) -> OHLCV:
        return self.window(max(len(self) - n, 0), None)

    def closed(self, timeframe: Timeframe, now: float | None = None) -> OHLCV:
        """The bars that have closed by `now`: a bar still forming enters no feature."""
        now = time.time() if now is None else now
        return self.until(int(now) - timeframe.seconds + 1)

    def until(self, ts_exclusive: int) -> OHLCV:
        """Bars that open before `ts_exclusive`."""
        return self.window(0, int(np.searchsorted(self.ts, ts_exclusive, side="left")))

    @classmethod
    def empty(cls) -> OHLCV:
        f = np.empty(0, dtype=np.float64)
        return cls(np.empty(0, dtype=np.int64), f, f, f, f, f)


def can_resample(base: Timeframe, target: Timeframe) -> bool:
    if target.seconds < base.seconds:
        return False
    # W1 bars open on Mondays; any base of a day or less divides a week; D1 divides W1.
    return target.seconds % base.seconds == 0


def resample(bars: OHLCV, base: Timeframe, target: Timeframe) -> OHLCV:
    """Aggregate base bars into completed bars of `target`.

    A target bar is complete when the base data reach its end: either a base bar of a later target bar
    exists, or the last base bar closes exactly at the target bar's close. The bar still forming is left
    out, so a target row never uses a base bar that had not closed when the target bar closed.
    """
    if target is base or len(bars) == 0:
        return bars
    if not can_resample(base, target):
        from shared.errors import ValidationFailed

        raise ValidationFailed(f"cannot build {target.value} bars from {base.value} bars")
    keys = target.floor(bars.ts)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(bars)] - 1
    last_key = int(keys[-1])
    if int(bars.ts[-1]) + base.seconds < last_key + target.seconds:
        starts, ends = starts[:-1], ends[:-1]
    if starts.size == 0:
        return OHLCV.empty()
    return OHLCV(
        ts=keys[starts].astype(np.int64),
        open=bars.open[starts],
        high=_reduce(np.maximum, bars.high, starts, ends),
        low=_reduce(np.minimum, bars.low, starts, ends),
        close=bars.close[ends],
        volume=_reduce(np.add, bars.volume, starts, ends),
    )


def _reduce(
    op: np.ufunc, values: npt.NDArray[np.float64], starts: npt.NDArray[np.intp], ends: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    # reduceat over the complete groups only: the slice stops at the last kept group's end.
    out = op.reduceat(values[: int(ends[-1]) + 1], starts)
    return np.asarray(out, dtype=np.float64)
