"""Indicators: feature computation vs bare TA-Lib vs pandas-ta; GET latency; ingest throughput.

`python -m benchmarks.bench_indicators [--quick]` prints a Markdown section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import repeat

import asyncpg
import httpx
import numpy as np
import orjson
import pandas as pd
import pandas_ta as ta
import talib

from benchmarks.common import (
    Paired,
    alternating,
    best_of,
    percentiles,
    profile_top,
    temporary_database,
    uvicorn_process,
    warnings_of,
)
from services.indicators import service
from shared.bars import bars_from_body, bars_to_rows, sorted_piece, split_body
from shared.errors import ValidationFailed
from shared.features import compute_features
from shared.market_repository import _BARS_COLUMNS, _PG_EPOCH_S, _copy_rows, _row_bytes
from shared.quality import quality_flags
from shared.settings import Settings
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars

KEY = "bench-admin-secret-000001"
SMA_T = talib.MA_Type.SMA  # type: ignore[attr-defined]


def bare_talib(b: OHLCV) -> None:
    """The same 17 indicators as bare TA-Lib calls, without the normalisation."""
    h, lo, c, v = b.high, b.low, b.close, b.volume
    talib.RSI(c, 14)
    talib.MACD(c, 12, 26, 9)
    talib.BBANDS(c, 20, 2.0, 2.0, SMA_T)
    talib.SMA(c, 50)
    talib.ATR(h, lo, c, 14)
    talib.STOCH(h, lo, c, 14, 3, SMA_T, 3, SMA_T)
    talib.ADX(h, lo, c, 14)
    talib.CCI(h, lo, c, 20)
    talib.WILLR(h, lo, c, 14)
    talib.MFI(h, lo, c, v, 14)
    talib.ROC(c, 10)
    talib.LINEARREG_SLOPE(talib.OBV(c, v), 20)
    talib.SMA(v, 20)


def pandas_ta_path(df: pd.DataFrame) -> None:
    """The same indicators through pandas-ta's functions (talib=True: it delegates to TA-Lib)."""
    h, lo, c, v = df["high"], df["low"], df["close"], df["volume"]
    ta.rsi(c, 14, talib=True)
    ta.macd(c, 12, 26, 9, talib=True)
    ta.bbands(c, 20, 2.0, 2.0, talib=True)
    ta.sma(c, 50, talib=True)
    ta.atr(h, lo, c, 14, talib=True)
    ta.stoch(h, lo, c, 14, 3, 3, talib=True)
    ta.adx(h, lo, c, 14, talib=True)
    ta.cci(h, lo, c, 20, talib=True)
    ta.willr(h, lo, c, 14, talib=True)
    ta.mfi(h, lo, c, v, 14, talib=True)
    ta.roc(c, 10, talib=True)
    ta.linreg(ta.obv(c, v, talib=True), 20, slope=True, talib=True)  # type: ignore[arg-type]
    ta.sma(v, 20, talib=True)


def _feature_rounds(b: OHLCV, df: pd.DataFrame, number: int, rounds: int) -> dict[str, list[float]]:
    return alternating(
        {
            "bare": lambda: best_of(lambda: bare_talib(b), 1, number),
            "ours": lambda: best_of(lambda: compute_features(b), 1, number),
            "pta": lambda: best_of(lambda: pandas_ta_path(df), 1, max(2, number // 5)),
        },
        rounds,
    )


def features_section(sizes: list[int], rounds: int) -> tuple[list[str], list[Paired]]:
    lines = [
        "| bars | bare TA-Lib (ms) | shared.features (ms) | ratio | pandas-ta functions (ms) | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    figures: list[Paired] = []
    for n in sizes:
        b = generate_bars("H1", n, seed=1)
        df = pd.DataFrame({"high": b.high, "low": b.low, "close": b.close, "volume": b.volume})
        number = max(2, 20_000 // max(n // 100, 1))
        # Times: Paired(a=bare, b=side) gives time(side) / time(bare) per round.
        got = _feature_rounds(b, df, number, rounds)
        ours, pta = Paired(got["bare"], got["ours"], True), Paired(got["bare"], got["pta"], True)
        figures += [ours, pta]
        med = {k: float(np.median(v)) * 1e3 for k, v in got.items()}
        lines.append(
            f"| {n:,} | {med['bare']:.3f} | {med['ours']:.3f} | {ours.times()} | {med['pta']:.3f} | {pta.times()} |"
        )
    return lines, figures


def bars_body(b: OHLCV) -> bytes:
    return orjson.dumps({"bars": bars_to_rows(b)})


CHUNK = 50_000


async def _reset(db: str) -> None:
    """Empty `bars` and write out what the last run left (a checkpoint), so each run starts alike."""
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("TRUNCATE bars, series")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def _copy_floor(db: str, bars: OHLCV, binary: bool) -> float:
    """The same bars written with nothing but COPY into `bars`, one transaction per 50,000 like the API: the
    binary COPY the ingest path builds (`binary`), or asyncpg's `copy_records_to_table` from Python tuples.
    Returns bars/s."""
    conn = await asyncpg.connect(db)
    try:
        flags = np.zeros(CHUNK, dtype=np.int16)
        t0 = time.perf_counter()
        for i in range(0, len(bars), CHUNK):
            w = bars.window(i, i + CHUNK)
            async with conn.transaction():
                if binary:
                    data = _copy_rows(("FLOOR", "M1"), (w.ts - _PG_EPOCH_S) * 1_000_000, w, flags[: len(w)])
                    await conn.copy_to_table("bars", source=memoryview(data), columns=_BARS_COLUMNS, format="binary")
                else:
                    stamps = [datetime.fromtimestamp(t, UTC) for t in w.ts.tolist()]
                    cols = (w.open.tolist(), w.high.tolist(), w.low.tolist(), w.close.tolist(), w.volume.tolist())
                    records = zip(repeat("FLOOR"), repeat("M1"), stamps, *cols, repeat(0))
                    await conn.copy_records_to_table("bars", records=records, columns=_BARS_COLUMNS)
        return len(bars) / (time.perf_counter() - t0)
    finally:
        await conn.close()


async def _phases(db: str, chunks: list[bytes]) -> dict[str, float]:
    """The API path's steps in this process, ms per 50,000-bar request (medians over the chunks): each step of
    the streamed ingest on its own, without the database, then `ingest_body` whole (which runs them while
    PostgreSQL writes); what a request spends outside that is HTTP (the body read by uvicorn, routing, auth, the
    answer)."""
    settings = Settings(database_url=db, api_keys="", environment="test")
    tf = Timeframe("M1")
    window = settings.quality_window_bars
    pool = await asyncpg.create_pool(db, min_size=1, max_size=1)
    got: dict[str, list[float]] = {k: [] for k in ("whole", "cut", "first", "pieces", "encode", "streamed")}
    try:
        for body in chunks:
            t = time.perf_counter()
            bars_from_body(body, tf, CHUNK)
            got["whole"].append(time.perf_counter() - t)
            t = time.perf_counter()
            pieces = split_body(body, service.STREAM_PIECE_BYTES)
            got["cut"].append(time.perf_counter() - t)
            assert pieces is not None
            read, after, context = [], None, OHLCV.empty()
            t = time.perf_counter()
            for k, piece in enumerate(pieces):
                bars = sorted_piece(piece, tf, after)
                assert bars is not None
                if not k:
                    got["first"].append(time.perf_counter() - t)
                flags = quality_flags(context, bars, tf, settings.quality_move_sigma, window)
                read.append((bars, flags))
                after, context = int(bars.ts[-1]), bars.tail(window + 1)
            got["pieces"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for bars, flags in read:
                _row_bytes(("PHASES", "M1"), (bars.ts - _PG_EPOCH_S) * 1_000_000, bars, flags)
            got["encode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            done = await service.ingest_body(pool, settings, "PHASES", tf, body)
            got["streamed"].append(time.perf_counter() - t)
            assert done is not None
    finally:
        await pool.close()
    return {k: float(np.median(v)) * 1e3 for k, v in got.items()}


def _post_each(client: httpx.Client, bodies: list[bytes]) -> None:
    for body in bodies:
        client.post("/v1/bars/BENCH/M1", content=body).raise_for_status()


def service_section(quick: bool) -> tuple[list[str], list[Paired]]:
    n_ingest = 200_000 if quick else 1_000_000
    n_requests = 500 if quick else 3000
    pairs = 2 if quick else 3
    out: list[str] = []
    with temporary_database() as db:
        env = {"DATABASE_URL": db, "API_KEYS": f"bench:admin:{KEY}", "LOG_LEVEL": "WARNING"}
        with uvicorn_process("services.indicators.main:app", env) as (base, server):
            bars = generate_bars("M1", n_ingest, seed=2)
            chunks = [bars_body(bars.window(i, i + CHUNK)) for i in range(0, n_ingest, CHUNK)]
            with httpx.Client(
                base_url=base, headers={"X-API-Key": KEY, "Content-Type": "application/json"}, timeout=300
            ) as client:

                def post_all() -> float:
                    t0 = time.perf_counter()
                    for body in chunks:
                        client.post("/v1/bars/BENCH/M1", content=body).raise_for_status()
                    return n_ingest / (time.perf_counter() - t0)

                def api() -> float:
                    asyncio.run(_reset(db))
                    return post_all()

                def api_two() -> float:
                    """The same requests from two client connections at once (a client that keeps one request
                    in flight while the other is written): context, not the figure held to the floor."""
                    asyncio.run(_reset(db))
                    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
                    with (
                        httpx.Client(base_url=base, headers=headers, timeout=300) as c2,
                        ThreadPoolExecutor(2) as pool,
                    ):
                        t0 = time.perf_counter()
                        done = [pool.submit(_post_each, c, chunks[k::2]) for k, c in enumerate((client, c2))]
                        for f in done:
                            f.result()
                        return n_ingest / (time.perf_counter() - t0)

                def floor(binary: bool) -> float:
                    asyncio.run(_reset(db))
                    return asyncio.run(_copy_floor(db, bars, binary))

                sides = {"api": api, "binary": lambda: floor(True), "records": lambda: floor(False), "api2": api_two}
                api()  # not measured: a server's first requests (its pool, code paths, pages) run slower
                got = alternating(sides, pairs)
                vs_binary, vs_records = Paired(got["binary"], got["api"]), Paired(got["records"], got["api"])
                two_vs_binary = Paired(got["binary"], got["api2"])
                # The same bars once more, all unchanged: every batch overlaps stored bars, so the staging upsert.
                api()
                again = post_all()
                asyncio.run(_reset(db))
                phases = asyncio.run(_phases(db, chunks))
                # HTTP's own share: a body refused after every bar is checked (422, nothing written) over HTTP
                # against the same work in this process, in alternating pairs. Its first bar is the bad one: the
                # streamed path hands it on at its first piece, before any write, and the whole path checks all.
                rows = bars_to_rows(bars.window(0, CHUNK))
                rows[0]["high"] = float(rows[0]["low"]) * 0.5  # type: ignore[arg-type]
                refused = orjson.dumps({"bars": rows})

                def over_http() -> float:
                    t0 = time.perf_counter()
                    r = client.post("/v1/bars/BENCH/M1", content=refused)
                    assert r.status_code == 422, r.text
                    return (time.perf_counter() - t0) * 1e3

                def in_process() -> float:
                    t0 = time.perf_counter()
                    pieces = split_body(refused, service.STREAM_PIECE_BYTES)
                    assert pieces is not None
                    assert sorted_piece(pieces[0], Timeframe("M1"), None) is None
                    with contextlib.suppress(ValidationFailed):
                        bars_from_body(refused, Timeframe("M1"), CHUNK)
                    return (time.perf_counter() - t0) * 1e3

                http_pairs = alternating({"http": over_http, "local": in_process}, 5 if quick else 9)
                http_ms = float(
                    np.median([a - b for a, b in zip(http_pairs["http"], http_pairs["local"], strict=True)])
                )
                asyncio.run(_reset(db))
                # Sampled for about as long as one ingest run took (py-spy stops at its duration).
                profile = profile_top(server.pid, post_all, max(2, round(n_ingest / float(np.median(got["api"])))))
                asyncio.run(_reset(db))  # the ingest runs' writes checkpointed, not under the reads timed next
                h1 = generate_bars("H1", 20_000, seed=3)
                client.post("/v1/bars/BENCH/H1", content=bars_body(h1)).raise_for_status()
                for _ in range(50):  # warm the pool and caches
                    client.get("/v1/indicators/BENCH/H1", params={"limit": 1}).raise_for_status()
                samples = []
                for _ in range(n_requests):
                    t = time.perf_counter()
                    client.get("/v1/indicators/BENCH/H1", params={"limit": 1}).raise_for_status()
                    samples.append(time.perf_counter() - t)
                p = percentiles(samples)
    med = {k: float(np.median(v)) for k, v in got.items()}
    each = "; ".join(f"{k} " + " / ".join(f"{x:,.0f}" for x in v) for k, v in got.items())
    api_ms = CHUNK / med["api"] * 1e3
    floor_ms = CHUNK / med["binary"] * 1e3
    cpu = phases["cut"] + phases["pieces"] + phases["encode"]
    out += [
        f"Ingest of {n_ingest:,} M1 bars in {CHUNK:,}-bar requests (one transaction each), {pairs} alternating "
        "rounds of the API and its floors, each from an empty `bars` table after a checkpoint; ratios are the "
        f"median of the per-round ratios (bars/s per round: {each}).",
        "",
        "| measurement | result | target |",
        "| --- | ---: | ---: |",
        f"| ingest over HTTP (`POST /v1/bars`, 1 uvicorn worker, sequential requests) | {med['api']:,.0f} bars/s | "
        "≥ 150,000 bars/s |",
        f"| floor: binary COPY of the same rows into `bars` from one process (what the API path writes with) | "
        f"{med['binary']:,.0f} bars/s | |",
        f"| API / binary COPY floor | {vs_binary.percent()} | ≥ 70 % |",
        f"| bare `copy_records_to_table` of the same rows (Python tuples, datetime per bar) | "
        f"{med['records']:,.0f} bars/s | |",
        f"| API / `copy_records_to_table` | {vs_records.percent()} | ≥ 70 % |",
        f"| context: the same requests from 2 client connections at once (1 uvicorn worker) | {med['api2']:,.0f} "
        f"bars/s; {two_vs_binary.percent()} of the binary COPY floor | |",
        f"| the same bars posted again, all unchanged (every batch overlaps: staging table + `INSERT … ON "
        f"CONFLICT`) | {again:,.0f} bars/s | |",
        f"| `GET /v1/indicators/BENCH/H1?limit=1` (20,000 H1 bars stored, {n_requests} sequential requests, "
        f"keep-alive) | p50 {p['p50']:.2f} ms, p95 {p['p95']:.2f} ms, p99 {p['p99']:.2f} ms | p99 < 10 ms |",
        "",
        f"### Where the time of one 50,000-bar request goes ({api_ms:.0f} ms at the API's median rate)",
        "",
        "A large body of new bars in time order is ingested streamed (`services.indicators.service.ingest_body`): "
        f"cut into pieces of {service.STREAM_PIECE_BYTES // 1024} KB at bar boundaries, each piece decoded, "
        "checked by every ingest rule, flagged and encoded while PostgreSQL writes the piece before it, in one "
        "COPY in one transaction; a piece that breaks a rule stops the COPY (nothing written) and the body is "
        "read whole, which names the bar. The steps below are timed one by one in the benchmark process on the "
        "same bodies, without the database (median ms per request), then the streamed ingest whole, with it.",
        "",
        "| step | ms |",
        "| --- | ---: |",
        f"| cut the body into pieces (`shared.bars.split_body`) | {phases['cut']:.1f} |",
        f"| first piece decoded and checked: the wait before the COPY starts (`sorted_piece`) | "
        f"{phases['first']:.1f} |",
        f"| every piece decoded, checked and flagged (`sorted_piece`, `quality_flags`) | {phases['pieces']:.1f} |",
        f"| every piece's COPY rows encoded (`market_repository._row_bytes`) | {phases['encode']:.1f} |",
        f"| sum of the CPU steps | {cpu:.1f} |",
        f"| the streamed ingest in this process, with the COPY and the commit (`ingest_body`) | "
        f"{phases['streamed']:.1f} |",
        f"| binary COPY floor, per 50,000 rows (its rounds above) | {floor_ms:.1f} |",
        f"| for comparison: the same body read whole, not streamed (`bars_from_body`: decode, every rule, sort) | "
        f"{phases['whole']:.1f} |",
        "",
        f"The streamed ingest took {phases['streamed'] - floor_ms:+.1f} ms against the floor's COPY of the same "
        f"rows although its CPU steps alone take {cpu:.0f} ms: they run while PostgreSQL writes. The API's "
        f"request took {api_ms - phases['streamed']:+.1f} ms more than the streamed ingest in this process: HTTP "
        f"(measured apart: a body refused after every bar is checked, 422, took {http_ms:+.1f} ms over HTTP "
        "against the same work in this process, median of the per-pair differences) and the machine's load "
        "between the API rounds and these timings.",
    ]
    out += ["", "Profile of the indicators server during one API ingest run:", "", *profile]
    return out, [vs_binary, vs_records, two_vs_binary]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 3 if args.quick else 5
    lines = [
        "## Indicators",
        "",
        f"17 features in-process ({rounds} alternating rounds of the three; each figure the median of a side's "
        "rounds, each ratio the median of the per-round ratios with their range; synthetic H1 bars from "
        "`tests.data.generate_bars`):",
        "",
    ]
    table, figures = features_section([200, 10_000] if args.quick else [200, 5_000, 10_000, 100_000], rounds)
    lines += table
    lines += ["", "Service (uvicorn, 1 worker, PostgreSQL on loopback; client on the same 2-core machine):", ""]
    service, more = service_section(args.quick)
    lines += service
    warn = warnings_of(*figures, *more)
    if warn:
        lines += ["", *warn]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
