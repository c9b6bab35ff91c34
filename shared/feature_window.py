"""Feature rows of a stored series, on its own or a higher timeframe, reading only the bars needed."""

from __future__ import annotations

import asyncpg

from shared.errors import NotEnoughBars, NotFoundError, ValidationFailed
from shared.features import FeatureRows, feature_rows
from shared.market_repository import latest_bars
from shared.timeframes import OHLCV, Timeframe, can_resample, resample
from shared.warmup import WARMUP_BARS


def bars_needed(rows: int) -> int:
    """Bars of a timeframe needed for `rows` feature rows: the warm-up plus the rows."""
    return WARMUP_BARS + rows


def base_bars_needed(base: Timeframe, target: Timeframe, rows: int) -> int:
    ratio = target.seconds // base.seconds
    # One extra target bar of base bars: the newest target bar may still be forming and is dropped.
    return (bars_needed(rows) + 1) * ratio


def rows_from_bars(bars: OHLCV, base: Timeframe, target: Timeframe, symbol: str, limit: int | None) -> FeatureRows:
    if not can_resample(base, target):
        raise ValidationFailed(
            f"timeframe {target.value} cannot be built from {base.value} bars: it must be a whole multiple "
            f"of {base.value}"
        )
    tbars = resample(bars.closed(base), base, target)
    if len(tbars) <= WARMUP_BARS:
        source = f"{target.value} bars" if target is base else f"completed {target.value} bars (from {base.value})"
        raise NotEnoughBars(f"need at least {WARMUP_BARS + 1} {source} for {symbol}, have {len(tbars)}")
    rows = feature_rows(tbars)
    if limit is not None and len(rows) > limit:
        rows = FeatureRows(rows.ts[-limit:], rows.values[-limit:])
    return rows


async def latest_feature_rows(
    conn: asyncpg.Connection | asyncpg.Pool, symbol: str, base: Timeframe, targets: list[Timeframe], limit: int
) -> dict[Timeframe, FeatureRows]:
    """The newest `limit` feature rows of each target timeframe, from one read of the base bars.

    Reads only what the most demanding target needs (its warm-up plus `limit` bars); beyond the warm-up,
    more history does not change a row (see shared.features.WARMUP_BARS).
    """
    for target in targets:
        if not can_resample(base, target):
            raise ValidationFailed(
                f"timeframe {target.value} cannot be built from {base.value} bars: it must be a whole multiple "
                f"of {base.value}"
            )
    needed = max(base_bars_needed(base, t, limit) for t in targets)
    bars = await latest_bars(conn, symbol, base, needed)
    if len(bars) == 0:
        raise NotFoundError(f"no {base.value} bars stored for {symbol}")
    return {t: rows_from_bars(bars, base, t, symbol, limit) for t in targets}
