"""Ingest with quality flags, and indicator rows for stored or client-sent bars."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

import asyncpg
import numpy as np
import numpy.typing as npt

from services.indicators.metrics import BARS_FLAGGED, BARS_INGESTED
from services.indicators.schemas import IngestResult
from shared.bars import sorted_piece, split_body
from shared.db import with_retry
from shared.feature_window import latest_feature_rows, rows_from_bars
from shared.features import FEATURE_NAMES, FeatureRows
from shared.market_repository import Declined, bars_before, copy_new_bars, has_bars_from, upsert_bars
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
    return _counted(symbol, inserted, updated, flags)


# Bodies of at least two pieces are ingested streamed (`ingest_body`); 512 KB is about 3,500 bars.
STREAM_PIECE_BYTES = 512 * 1024


async def ingest_body(
    pool: asyncpg.Pool, settings: Settings, symbol: str, timeframe: Timeframe, body: bytes
) -> tuple[IngestResult, int] | None:
    """Ingest a large body of new bars sent in time order while it is read: the body is cut into pieces
    (`shared.bars.split_body`), and each piece is decoded, checked by every ingest rule and flagged while
    PostgreSQL writes the one before it, in one COPY, in one transaction. Returns the result and the newest
    bar's epoch second.

    None, with nothing written, for any other body: a small one, bars out of order, a series with a bar stored
    at or after the first one, more than `MAX_BARS_PER_REQUEST` bars, a piece that breaks a rule. The caller
    then ingests it whole (`bars_from_body`, `ingest`), which names what is wrong or sorts, upserts and counts.
    A batch with a bad bar is thus refused whole either way, with the same message."""
    pieces = split_body(body, STREAM_PIECE_BYTES)
    first = sorted_piece(pieces[0], timeframe, None) if pieces else None
    if pieces is None or first is None:
        return None
    window = settings.quality_window_bars

    async def run() -> tuple[int, npt.NDArray[np.int16]] | None:
        async with pool.acquire() as conn, conn.transaction():
            start = int(first.ts[0])
            if await has_bars_from(conn, symbol, timeframe, start):
                return None
            context = await bars_before(conn, symbol, timeframe, start, window + 1)
            flags: list[npt.NDArray[np.int16]] = []

            def checked() -> Iterator[tuple[OHLCV, npt.NDArray[np.int16]]]:
                nonlocal context
                bars, count = first, 0
                for k, piece in enumerate(pieces):
                    if k:
                        read = sorted_piece(piece, timeframe, int(bars.ts[-1]))
                        if read is None:
                            raise Declined
                        bars = read
                    count += len(bars)
                    if count > settings.max_bars_per_request:
                        raise Declined
                    f = quality_flags(context, bars, timeframe, settings.quality_move_sigma, window)
                    flags.append(f)
                    yield bars, f  # PostgreSQL writes these while the next piece is read
                    # The next piece is flagged against the bars just before it, as a request's batch is.
                    context = _joined_tail(context, bars, window + 1)

            span = await copy_new_bars(conn, symbol, timeframe, checked())
            if span is None:
                return None
            return span[1], np.concatenate(flags)

    done = await with_retry(run)
    if done is None:
        return None
    last, flags = done
    return _counted(symbol, len(flags), 0, flags), last


def _joined_tail(a: OHLCV, b: OHLCV, n: int) -> OHLCV:
    if len(b) >= n:
        return b.tail(n)
    a = a.tail(n - len(b))
    fields = ("ts", "open", "high", "low", "close", "volume")
    return OHLCV(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in fields))


def _counted(symbol: str, inserted: int, updated: int, flags: npt.NDArray[np.int16]) -> IngestResult:
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
