"""Indicators: feature computation vs bare TA-Lib vs pandas-ta; GET latency; ingest throughput.

`python -m benchmarks.bench_indicators [--quick]` prints a Markdown section.
"""

from __future__ import annotations

import argparse
import time

import httpx
import orjson
import pandas as pd
import pandas_ta as ta
import talib

from benchmarks.common import best_of, percentiles, temporary_database, uvicorn_server
from shared.bars import bars_to_rows
from shared.features import compute_features
from shared.timeframes import OHLCV
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


def features_section(sizes: list[int]) -> list[str]:
    lines = [
        "| bars | bare TA-Lib (ms) | shared.features (ms) | ratio | pandas-ta functions (ms) | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sizes:
        b = generate_bars("H1", n, seed=1)
        df = pd.DataFrame({"high": b.high, "low": b.low, "close": b.close, "volume": b.volume})
        number = max(2, 20_000 // max(n // 100, 1))
        t_bare = best_of(lambda b=b: bare_talib(b), 5, number)
        t_ours = best_of(lambda b=b: compute_features(b), 5, number)
        t_pta = best_of(lambda df=df: pandas_ta_path(df), 3, max(2, number // 5))
        lines.append(
            f"| {n:,} | {t_bare * 1e3:.3f} | {t_ours * 1e3:.3f} | {t_ours / t_bare:.2f}× | "
            f"{t_pta * 1e3:.3f} | {t_pta / t_bare:.1f}× |"
        )
    return lines


def bars_body(b: OHLCV) -> bytes:
    return orjson.dumps({"bars": bars_to_rows(b)})


def service_section(quick: bool) -> list[str]:
    n_ingest = 200_000 if quick else 1_000_000
    n_requests = 500 if quick else 3000
    out: list[str] = []
    with temporary_database() as db:
        env = {"DATABASE_URL": db, "API_KEYS": f"bench:admin:{KEY}", "LOG_LEVEL": "WARNING"}
        with uvicorn_server("services.indicators.main:app", env) as base:
            bars = generate_bars("M1", n_ingest, seed=2)
            chunks = [bars_body(bars.window(i, i + 50_000)) for i in range(0, n_ingest, 50_000)]
            with httpx.Client(
                base_url=base, headers={"X-API-Key": KEY, "Content-Type": "application/json"}, timeout=300
            ) as client:
                t0 = time.perf_counter()
                for body in chunks:
                    r = client.post("/v1/bars/BENCH/M1", content=body)
                    r.raise_for_status()
                ingest_s = time.perf_counter() - t0
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
    out += [
        "| measurement | result | target |",
        "| --- | ---: | ---: |",
        f"| ingest {n_ingest:,} M1 bars over HTTP (50,000 per request, 1 uvicorn worker) | "
        f"{n_ingest / ingest_s:,.0f} bars/s ({ingest_s:.1f} s) | ≥ 100,000 bars/s |",
        f"| `GET /v1/indicators/BENCH/H1?limit=1` (20,000 H1 bars stored, {n_requests} sequential requests, "
        f"keep-alive) | p50 {p['p50']:.2f} ms, p95 {p['p95']:.2f} ms, p99 {p['p99']:.2f} ms | p99 < 10 ms |",
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    lines = [
        "## Indicators",
        "",
        "17 features in-process (best of 5 rounds; synthetic H1 bars from `tests.data.generate_bars`):",
        "",
    ]
    lines += features_section([200, 10_000] if args.quick else [200, 5_000, 10_000, 100_000])
    lines += ["", "Service (uvicorn, 1 worker, PostgreSQL on loopback; client on the same 2-core machine):", ""]
    lines += service_section(args.quick)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
