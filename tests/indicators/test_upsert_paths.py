"""`upsert_bars`' two write paths give the same rows and counts: the direct binary COPY into `bars` (no stored
bar in the batch's range) and the staging-table upsert (overlap, or a concurrent writer in the range)."""

from __future__ import annotations

import asyncio

import asyncpg
import numpy as np
import numpy.typing as npt

from shared.market_repository import upsert_bars
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars

H1 = Timeframe("H1")
COLUMNS = ("ts", "open", "high", "low", "close", "volume")


async def _stored(conn: asyncpg.Connection, symbol: str) -> list[tuple[int, float, float, float, float, float, int]]:
    rows = await conn.fetch(
        "SELECT extract(epoch FROM ts)::bigint, open, high, low, close, volume, flags FROM bars "
        "WHERE symbol = $1 AND timeframe = 'H1' ORDER BY ts",
        symbol,
    )
    return [tuple(r) for r in rows]


def _expected(bars: OHLCV, flags: npt.NDArray[np.int16]) -> list[tuple[int, float, float, float, float, float, int]]:
    cols = (bars.ts.tolist(), bars.open.tolist(), bars.high.tolist(), bars.low.tolist(), bars.close.tolist())
    return list(zip(*cols, bars.volume.tolist(), flags.tolist(), strict=True))


async def _upsert(conn: asyncpg.Connection, symbol: str, bars: OHLCV, flags: npt.NDArray[np.int16]) -> tuple[int, int]:
    async with conn.transaction():
        return await upsert_bars(conn, symbol, H1, bars, flags)


async def test_new_range_overlap_and_partial_overlap_store_the_same_rows(database_url: str) -> None:
    bars = generate_bars("H1", 300, seed=11)
    flags = (np.arange(300) % 3).astype(np.int16)
    conn = await asyncpg.connect(database_url)
    try:
        # New range: the direct COPY; every value exact, float bits and flags included.
        assert await _upsert(conn, "PATHS", bars.window(0, 200), flags[:200]) == (200, 0)
        assert await _stored(conn, "PATHS") == _expected(bars.window(0, 200), flags[:200])
        # The same bars again: staging path, nothing changed.
        assert await _upsert(conn, "PATHS", bars.window(0, 200), flags[:200]) == (0, 0)
        # 100 of them again (2 changed) and 100 new ones: staging path, counted apart.
        changed = OHLCV(*(getattr(bars, f)[100:300].copy() for f in COLUMNS))
        changed.close[:2] = changed.close[:2] * 1.0001
        changed.high[:2] = np.maximum(changed.high[:2], changed.close[:2])
        assert await _upsert(conn, "PATHS", changed, flags[100:]) == (100, 2)
        whole = OHLCV(*(np.concatenate([getattr(bars, f)[:100], getattr(changed, f)]) for f in COLUMNS))
        assert await _stored(conn, "PATHS") == _expected(whole, flags)
        # The series row covers both batches.
        first, last = await conn.fetchrow(
            "SELECT extract(epoch FROM first_ts)::bigint, extract(epoch FROM last_ts)::bigint FROM series "
            "WHERE symbol = 'PATHS' AND timeframe = 'H1'"
        )
        assert (first, last) == (int(bars.ts[0]), int(bars.ts[-1]))
    finally:
        await conn.close()


async def test_a_concurrent_writer_in_the_range_falls_back_to_the_upsert(database_url: str) -> None:
    """Another transaction stores one bar of the range after the overlap check found none: the direct COPY
    waits for it, fails on the primary key, and the batch goes through the upsert instead, counting that bar as
    an update, never as a second row."""
    bars = generate_bars("H1", 50, seed=12)
    flags = np.zeros(50, dtype=np.int16)
    a = await asyncpg.connect(database_url)
    b = await asyncpg.connect(database_url)
    try:
        other = b.transaction()
        await other.start()
        await b.execute(
            "INSERT INTO bars (symbol, timeframe, ts, open, high, low, close, volume) "
            "VALUES ('RACE', 'H1', to_timestamp($1), 1, 1, 1, 1, 1)",
            int(bars.ts[10]),
        )
        task = asyncio.create_task(_upsert(a, "RACE", bars, flags))
        await asyncio.sleep(0.5)
        assert not task.done(), "the COPY should wait for the other transaction's row"
        await other.commit()
        assert await asyncio.wait_for(task, 30) == (49, 1)
        assert await _stored(a, "RACE") == _expected(bars, flags)
    finally:
        await a.close()
        await b.close()
