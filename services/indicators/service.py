"""Ingest with quality flags, and indicator rows for stored or client-sent bars."""

from __future__ import annotations

from collections import Counter as Tally

import asyncpg
import numpy as np
import numpy.typing as npt

from services.indicators.metrics import BARS_FLAGGED, BARS_INGESTED
from services.indicators.schemas import IngestResult
from shared.db import with_retry
from shared.feature_window import latest_feature_rows, rows_from_bars
from shared.features import FEATURE_NAMES, FeatureRows
from shared.market_repository import bars_before, upsert_bars
from shared.quality import FLAG_REASONS, quality_flags
from shared.settings import Settings
from shared.timeframes import OHLCV, Timeframe


async def ingest(
    pool: asyncpg.Pool, settings: Settings, symbol: str, timeframe: Timeframe, bars: OHLCV
) -> IngestResult:
    async def run() -> tuple[int, int, npt.NDArray[np.int16]]:
        async with pool.acquire() as conn, conn.transaction():
            context = await bars_before(conn, symbol, timeframe, int(bars.ts[0]), settings.quality_window_bars + 1)
            flags = quality_flags(context, bars, timeframe, settings.quality_move_sigma, settings.quality_window_bars)
            inserted, updated = await upsert_bars(conn, symbol, timeframe, bars, flags)
            return inserted, updated, flags

    inserted, updated, flags = await with_retry(run)
    BARS_INGESTED.labels(symbol).inc(inserted + updated)
    tally: Tally[str] = Tally()
    for bit, reason in FLAG_REASONS.items():
        tally[reason] = int(np.count_nonzero(flags & bit))
    for reason, n in tally.items():
        if n:
            BARS_FLAGGED.labels(symbol, reason).inc(n)
    return IngestResult(inserted=inserted, updated=updated, flagged=int(np.count_nonzero(flags)))


def _unique(targets: list[Timeframe]) -> list[Timeframe]:
    return list(dict.fromkeys(targets))


async def stored_rows(
    pool: asyncpg.Pool, symbol: str, base: Timeframe, targets: list[Timeframe], limit: int
) -> dict[Timeframe, FeatureRows]:
    unique = _unique(targets)
    return await with_retry(lambda: latest_feature_rows(pool, symbol, base, unique, limit))


def client_rows(
    bars: OHLCV, symbol: str, base: Timeframe, targets: list[Timeframe], limit: int | None
) -> dict[Timeframe, FeatureRows]:
    return {t: rows_from_bars(bars, base, t, symbol, limit) for t in _unique(targets)}


def render_rows(rows: FeatureRows, fmt: str = "rows") -> list[dict[str, object]] | dict[str, object]:
    """`rows`: [{"ts", "values": {feature: number}}]; `columns`: {"ts": [...], "names": [...], "values": [[...]]}
    (the same numbers; for 20 rows 3x cheaper to render, 2x to parse: benchmarks/bench_stack.py; the predictor
    reads this form)."""
    stamps = [f"{s}Z" for s in np.datetime_as_string(rows.ts.astype("datetime64[s]"), unit="s").tolist()]
    if fmt == "columns":
        return {"ts": stamps, "names": list(FEATURE_NAMES), "values": rows.values}
    return [
        {"ts": s, "values": dict(zip(FEATURE_NAMES, v, strict=True))}
        for s, v in zip(stamps, rows.values.tolist(), strict=True)
    ]
