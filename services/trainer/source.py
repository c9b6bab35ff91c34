"""Where a series' bars come from: its own stored timeframe, or the nearest lower one resampled."""

from __future__ import annotations

import asyncpg

from shared.errors import NotFoundError
from shared.market_repository import all_bars, list_series
from shared.timeframes import OHLCV, Timeframe, can_resample


async def resolve_base(conn: asyncpg.Connection | asyncpg.Pool, symbol: str, target: Timeframe) -> Timeframe:
    """`target` itself when stored, else the highest stored timeframe that divides it (fewest bars to read)."""
    stored = {s.timeframe for s in await list_series(conn, symbol)}
    if target in stored:
        return target
    lower = [t for t in stored if t.seconds < target.seconds and can_resample(t, target)]
    if not lower:
        have = ", ".join(sorted(t.value for t in stored)) or "none"
        raise NotFoundError(
            f"no bars stored for {symbol} on {target.value} or on a lower timeframe that divides it "
            f"(stored timeframes: {have})"
        )
    return max(lower, key=lambda t: t.seconds)


async def load_bars(conn: asyncpg.Connection | asyncpg.Pool, symbol: str, target: Timeframe) -> tuple[OHLCV, Timeframe]:
    base = await resolve_base(conn, symbol, target)
    bars = await all_bars(conn, symbol, base)
    if len(bars) == 0:
        raise NotFoundError(f"no {base.value} bars stored for {symbol}")
    return bars, base
