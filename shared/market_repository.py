"""All SQL of the market-data store (bars, series): the indicators service's reads and writes, the trainer's
training reads and new-bar counts, and the predictor's series stamps."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from shared.timeframes import OHLCV, Timeframe

_STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS bars_staging (
    t bigint NOT NULL, open float8 NOT NULL, high float8 NOT NULL, low float8 NOT NULL,
    close float8 NOT NULL, volume float8 NOT NULL, flags smallint NOT NULL
) ON COMMIT DELETE ROWS
"""

_UPSERT = """
WITH up AS (
    INSERT INTO bars AS b (symbol, timeframe, ts, open, high, low, close, volume, flags)
    SELECT $1, $2, to_timestamp(t), open, high, low, close, volume, flags FROM bars_staging
    ON CONFLICT (symbol, timeframe, ts) DO UPDATE
       SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
           volume = EXCLUDED.volume, flags = EXCLUDED.flags
     WHERE (b.open, b.high, b.low, b.close, b.volume, b.flags)
           IS DISTINCT FROM (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.volume,
                             EXCLUDED.flags)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted, count(*) FILTER (WHERE NOT inserted) AS updated FROM up
"""

_SERIES_UPSERT = """
INSERT INTO series (symbol, timeframe, first_ts, last_ts, updated_at)
VALUES ($1, $2, to_timestamp($3), to_timestamp($4), now())
ON CONFLICT (symbol, timeframe) DO UPDATE
   SET first_ts = LEAST(series.first_ts, EXCLUDED.first_ts),
       last_ts = GREATEST(series.last_ts, EXCLUDED.last_ts),
       updated_at = now()
"""

# NOTIFY channel: {"symbol", "timeframe", "first_ts", "last_ts"} (epoch seconds) after bars of a series change.
SERIES_CHANNEL = "market_series"

_COLUMNS = "extract(epoch FROM ts)::float8, open, high, low, close, volume"


@dataclass(frozen=True)
class SeriesInfo:
    symbol: str
    timeframe: Timeframe
    first_ts: datetime
    last_ts: datetime


def _to_ohlcv(rows: list[asyncpg.Record], newest_first: bool) -> OHLCV:
    if not rows:
        return OHLCV.empty()
    m: npt.NDArray[np.float64] = np.array(rows, dtype=np.float64)
    if newest_first:
        m = m[::-1]
    m = np.ascontiguousarray(m.T)
    return OHLCV(m[0].astype(np.int64), m[1], m[2], m[3], m[4], m[5])


# PostgreSQL's binary COPY format (the "PGCOPY" header, then per row a field count and each field as its
# length and big-endian bytes), built column-wise with numpy: no Python object per bar. timestamptz travels as
# microseconds since 2000-01-01 UTC.
_PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_PGCOPY_TRAILER = b"\xff\xff"
_PG_EPOCH_S = 946_684_800
_BARS_COLUMNS = ("symbol", "timeframe", "ts", "open", "high", "low", "close", "volume", "flags")
_OVERLAP = (
    "SELECT EXISTS (SELECT 1 FROM bars WHERE symbol = $1 AND timeframe = $2 "
    "AND ts BETWEEN to_timestamp($3) AND to_timestamp($4))"
)


def _copy_rows(texts: Sequence[str], ts: npt.NDArray[np.int64], bars: OHLCV, flags: npt.NDArray[np.int16]) -> bytes:
    """Binary COPY data: the constant `texts` columns, then ts (int8: `ts` as given), the five prices and volume
    (float8) and flags (int2), one row per bar."""
    return _PGCOPY_HEADER + _row_bytes(texts, ts, bars, flags) + _PGCOPY_TRAILER


def _row_bytes(texts: Sequence[str], ts: npt.NDArray[np.int64], bars: OHLCV, flags: npt.NDArray[np.int16]) -> bytes:
    """The rows of `_copy_rows`, without the header and trailer."""
    encoded = [t.encode() for t in texts]
    fields: list[tuple[str, str]] = [("count", ">i2")]
    for k, e in enumerate(encoded):
        fields += [(f"len_t{k}", ">i4"), (f"t{k}", f"S{len(e)}")]
    numeric = [("ts", ">i8"), *((f, ">f8") for f in ("open", "high", "low", "close", "volume")), ("flags", ">i2")]
    for name, kind in numeric:
        fields += [(f"len_{name}", ">i4"), (name, kind)]
    rows = np.empty(len(ts), dtype=np.dtype(fields))
    rows["count"] = len(encoded) + len(numeric)
    for k, e in enumerate(encoded):
        rows[f"len_t{k}"] = len(e)
        rows[f"t{k}"] = e
    columns: dict[str, npt.NDArray[Any]] = {
        "ts": ts,
        "open": bars.open,
        "high": bars.high,
        "low": bars.low,
        "close": bars.close,
    }
    columns |= {"volume": bars.volume, "flags": flags}
    for name, kind in numeric:
        rows[f"len_{name}"] = np.dtype(kind).itemsize
        rows[name] = columns[name]
    return rows.tobytes()


async def upsert_bars(
    conn: asyncpg.Connection, symbol: str, timeframe: Timeframe, bars: OHLCV, flags: npt.NDArray[np.int16]
) -> tuple[int, int]:
    """Upsert; returns (inserted, updated). Caller owns the transaction.

    When the series has no stored bar in the batch's time range (new bars, the usual ingest), the bars are
    COPYed straight into `bars`: every one is an insert, and the upsert from a staging table would only add
    its conflict checks (benchmarks/bench_indicators.py measures both). Otherwise, or when a concurrent writer
    stored one of these bars meanwhile (the COPY then fails on the primary key and is rolled back to its
    savepoint), they go through the staging table and INSERT ... ON CONFLICT, which counts what changed."""
    first, last = int(bars.ts[0]), int(bars.ts[-1])
    counts: tuple[int, int] | None = None
    if not await conn.fetchval(_OVERLAP, symbol, timeframe.value, first, last):
        data = _copy_rows((symbol, timeframe.value), (bars.ts.astype(np.int64) - _PG_EPOCH_S) * 1_000_000, bars, flags)
        try:
            async with conn.transaction():
                await conn.copy_to_table("bars", source=memoryview(data), columns=_BARS_COLUMNS, format="binary")
            counts = (len(bars), 0)
        except asyncpg.UniqueViolationError:
            counts = None
    if counts is None:
        await conn.execute(_STAGING_DDL)
        data = _copy_rows((), bars.ts, bars, flags)
        await conn.copy_to_table("bars_staging", source=memoryview(data), format="binary")
        row = await conn.fetchrow(_UPSERT, symbol, timeframe.value)
        assert row is not None
        counts = (int(row["inserted"]), int(row["updated"]))
    await _series_written(conn, symbol, timeframe, first, last, changed=any(counts))
    return counts


async def _series_written(
    conn: asyncpg.Connection, symbol: str, timeframe: Timeframe, first: int, last: int, *, changed: bool
) -> None:
    await conn.execute(_SERIES_UPSERT, symbol, timeframe.value, first, last)
    if changed:
        # Delivered when the caller's transaction commits: readers caching on a series (the predictor) learn
        # that its stored bars changed without asking PostgreSQL on every request.
        await conn.execute(
            "SELECT pg_notify($1, $2)",
            SERIES_CHANNEL,
            json.dumps({"symbol": symbol, "timeframe": timeframe.value, "first_ts": first, "last_ts": last}),
        )


_FROM = "SELECT EXISTS (SELECT 1 FROM bars WHERE symbol = $1 AND timeframe = $2 AND ts >= to_timestamp($3))"


class Declined(Exception):
    """Raised by a `copy_new_bars` source to stop the COPY: nothing of it is written."""


async def has_bars_from(conn: asyncpg.Connection, symbol: str, timeframe: Timeframe, ts: int) -> bool:
    """Whether the series has a stored bar opening at or after epoch second `ts`."""
    return bool(await conn.fetchval(_FROM, symbol, timeframe.value, ts))


async def copy_new_bars(
    conn: asyncpg.Connection, symbol: str, timeframe: Timeframe, pieces: Iterator[tuple[OHLCV, npt.NDArray[np.int16]]]
) -> tuple[int, int] | None:
    """COPY bars, none of them stored yet, straight into `bars` as `pieces` yields them (each in time order and
    after the one before), so PostgreSQL writes one piece while the next is made; then the series row and its
    notification. Returns the first and last epoch second written; None, with nothing written, when `pieces`
    raises `Declined` or a bar turns out to be stored already (a concurrent writer). Caller owns the transaction.
    """
    first: int | None = None
    last = 0
    texts = (symbol, timeframe.value)

    async def source() -> AsyncIterator[bytes]:
        nonlocal first, last
        head = _PGCOPY_HEADER
        for bars, flags in pieces:
            if first is None:
                first = int(bars.ts[0])
            last = int(bars.ts[-1])
            yield head + _row_bytes(texts, (bars.ts - _PG_EPOCH_S) * 1_000_000, bars, flags)
            head = b""
        yield head + _PGCOPY_TRAILER

    try:
        async with conn.transaction():
            await conn.copy_to_table("bars", source=source(), columns=_BARS_COLUMNS, format="binary")
    except (Declined, asyncpg.UniqueViolationError):
        return None
    if first is None:
        return None
    await _series_written(conn, symbol, timeframe, first, last, changed=True)
    return first, last


async def bars_before(conn: asyncpg.Connection, symbol: str, timeframe: Timeframe, ts: int, n: int) -> OHLCV:
    """The `n` stored bars strictly before epoch second `ts`, oldest first."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM bars WHERE symbol = $1 AND timeframe = $2 AND ts < to_timestamp($3) "  # noqa: S608
        "ORDER BY ts DESC LIMIT $4",
        symbol,
        timeframe.value,
        ts,
        n,
    )
    return _to_ohlcv(rows, newest_first=True)


# Features read closed bars only: a bar still forming (it closes after now) enters no indicator, so a row
# never changes once served and training (which sees the final bar) and serving see the same values.
_CLOSED = "ts <= now() - make_interval(secs => $3::float8)"


async def latest_bars(conn: asyncpg.Connection | asyncpg.Pool, symbol: str, timeframe: Timeframe, n: int) -> OHLCV:
    """The `n` newest closed bars, oldest first."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM bars WHERE symbol = $1 AND timeframe = $2 AND {_CLOSED} "  # noqa: S608
        "ORDER BY ts DESC LIMIT $4",
        symbol,
        timeframe.value,
        float(timeframe.seconds),
        n,
    )
    return _to_ohlcv(rows, newest_first=True)


async def bars_range(
    conn: asyncpg.Connection | asyncpg.Pool,
    symbol: str,
    timeframe: Timeframe,
    start: datetime | None,
    end: datetime | None,
    limit: int,
) -> OHLCV:
    """Bars with start <= ts < end; the newest `limit` of them, oldest first."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM bars WHERE symbol = $1 AND timeframe = $2 "  # noqa: S608
        "AND ($3::timestamptz IS NULL OR ts >= $3) AND ($4::timestamptz IS NULL OR ts < $4) "
        "ORDER BY ts DESC LIMIT $5",
        symbol,
        timeframe.value,
        start,
        end,
        limit,
    )
    return _to_ohlcv(rows, newest_first=True)


async def all_bars(conn: asyncpg.Connection | asyncpg.Pool, symbol: str, timeframe: Timeframe) -> OHLCV:
    """Every closed bar of the series, oldest first (training)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM bars WHERE symbol = $1 AND timeframe = $2 AND {_CLOSED} ORDER BY ts",  # noqa: S608
        symbol,
        timeframe.value,
        float(timeframe.seconds),
    )
    return _to_ohlcv(rows, newest_first=False)


async def list_series(conn: asyncpg.Connection | asyncpg.Pool, symbol: str | None = None) -> list[SeriesInfo]:
    rows = await conn.fetch(
        "SELECT symbol, timeframe, first_ts, last_ts FROM series WHERE $1::text IS NULL OR symbol = $1 "
        "ORDER BY symbol, timeframe",
        symbol,
    )
    return [
        SeriesInfo(r["symbol"], Timeframe(r["timeframe"]), r["first_ts"].astimezone(UTC), r["last_ts"].astimezone(UTC))
        for r in rows
    ]


async def count_bars(conn: asyncpg.Connection | asyncpg.Pool, symbol: str, timeframe: Timeframe) -> int:
    n = await conn.fetchval("SELECT count(*) FROM bars WHERE symbol = $1 AND timeframe = $2", symbol, timeframe.value)
    return int(n or 0)


async def bars_after(conn: asyncpg.Connection | asyncpg.Pool, symbol: str, timeframe: str, after_epoch_s: float) -> int:
    """Stored bars of a series that open after epoch second `after_epoch_s` (the trainer's retrain schedule)."""
    n = await conn.fetchval(
        "SELECT count(*) FROM bars WHERE symbol = $1 AND timeframe = $2 AND ts > to_timestamp($3)",
        symbol,
        timeframe,
        after_epoch_s,
    )
    return int(n or 0)


@dataclass(frozen=True)
class SeriesStamp:
    """What identifies the stored input window: the newest bar and the last time any bar changed."""

    last_ts: int
    updated_at: datetime
    close: float


async def series_stamp(pool: asyncpg.Pool, symbol: str, timeframe: str) -> SeriesStamp | None:
    """The stamp of one series (the predictor's cache key for stored bars); None when it has no bars."""
    row = await pool.fetchrow(
        "SELECT extract(epoch FROM s.last_ts)::bigint AS last_ts, s.updated_at, b.close "
        "FROM series s JOIN bars b ON b.symbol = s.symbol AND b.timeframe = s.timeframe AND b.ts = s.last_ts "
        "WHERE s.symbol = $1 AND s.timeframe = $2",
        symbol,
        timeframe,
    )
    if row is None:
        return None
    return SeriesStamp(int(row["last_ts"]), row["updated_at"], float(row["close"]))


async def series_stamps(pool: asyncpg.Pool, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SeriesStamp]:
    """The stamps of several series in one query (the stamp poll); series without bars are absent."""
    rows = await pool.fetch(
        "SELECT s.symbol, s.timeframe, extract(epoch FROM s.last_ts)::bigint AS last_ts, s.updated_at, b.close "
        "FROM unnest($1::text[], $2::text[]) AS k(symbol, timeframe) "
        "JOIN series s ON s.symbol = k.symbol AND s.timeframe = k.timeframe "
        "JOIN bars b ON b.symbol = s.symbol AND b.timeframe = s.timeframe AND b.ts = s.last_ts",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {
        (r["symbol"], r["timeframe"]): SeriesStamp(int(r["last_ts"]), r["updated_at"], float(r["close"])) for r in rows
    }
