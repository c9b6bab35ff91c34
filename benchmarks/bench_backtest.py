"""Backtester: run_backtest on a million bars, without and with ATR stops, against the buy-and-hold floor.

The timed call is run_backtest with its metrics and the trades as columns (`BacktestResult.trade_table`); the
list of trade dicts (`BacktestResult.trades`) is rendered on first access only, so it is timed on its own.

`python -m benchmarks.bench_backtest [--quick]` prints a Markdown section. `measure(n)` returns the rows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.common import best_of
from services.trainer.backtest import BacktestParams, run_backtest
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars

TARGET_S = 1.0  # for 1,000,000 bars


def buy_and_hold(b: OHLCV) -> float:
    """The floor: one pass of arithmetic over the same arrays (an equity curve of close ratios)."""
    curve = np.cumprod(b.close[1:] / b.close[:-1])
    return float(curve[-1])


def signal_series(n: int, switch_probability: float, seed: int) -> npt.NDArray[np.int8]:
    """Random signals; each bar draws a fresh one with `switch_probability` (1.0: i.i.d., a new trade about
    every 1.5 bars, the worst case for the trade list), else repeats the last."""
    rng = np.random.default_rng(seed)
    fresh = rng.integers(-1, 2, n).astype(np.int8)
    if switch_probability >= 1.0:
        return fresh
    draw = rng.random(n) < switch_probability
    draw[0] = True
    last = np.maximum.accumulate(np.where(draw, np.arange(n), 0))
    return np.asarray(fresh[last], dtype=np.int8)


def atr_14(b: OHLCV) -> npt.NDArray[np.float64]:
    prev = np.r_[b.close[0], b.close[:-1]]
    tr = np.maximum(b.high, prev) - np.minimum(b.low, prev)
    kernel = np.full(14, 1 / 14)
    out = np.convolve(tr, kernel)[: tr.size]
    out[:13] = np.nan  # the first 13 bars have no full window; the signals there are HOLD
    return out


def best_with_gc(fn: Callable[[], object], repeat: int) -> float:
    """Best seconds of one call, as a caller runs it: the cyclic GC on (timeit pauses it) and the result kept
    alive until the clock stops (timeit frees it inside the timing, which for a big list is part of the bill)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return min(times)


def measure(n: int, repeat: int) -> list[dict[str, Any]]:
    bars = generate_bars("H1", n, seed=1)
    atr = atr_14(bars)
    floor_s = best_of(lambda: buy_and_hold(bars), repeat, 3)
    plain = BacktestParams(cost_bps=2, session="24/5")
    stops = BacktestParams(cost_bps=2, session="24/5", stop_atr=2.0, take_profit_atr=3.0)
    rows: list[dict[str, Any]] = []
    for label, switch in (("i.i.d. signals", 1.0), ("signals held ~20 bars", 0.05)):
        s = signal_series(n, switch, seed=2)
        s[:14] = 0
        for p, stop_label in ((plain, "no stops"), (stops, "ATR stop 2 / target 3")):
            result = run_backtest(bars, s, Timeframe.H1, p, atr=atr)
            # cached_property keeps what it built in the instance dict: absent, the timing below is not theirs.
            if "trades" in vars(result):
                raise RuntimeError("run_backtest rendered the trade dicts; the benchmark would time them too")
            t = best_of(lambda s=s, p=p: run_backtest(bars, s, Timeframe.H1, p, atr=atr), repeat, 1)
            # What result.trades costs on first access; stops change the exits, not the number of dicts.
            render = best_with_gc(result.trade_table.to_dicts, repeat) if p is plain else None
            rows.append(
                {
                    "case": f"{label}, {stop_label}",
                    "bars": n,
                    "trades": result.metrics["trades"],
                    "seconds": t,
                    "floor_seconds": floor_s,
                    "ratio": t / floor_s,
                    "render_seconds": render,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 200_000 if args.quick else 1_000_000
    rows = measure(n, repeat=3 if args.quick else 5)
    lines = [
        "## Backtester",
        "",
        f"`services.trainer.backtest.run_backtest` on {n:,} synthetic H1 bars (`tests.data.generate_bars`, seed 1),"
        " 2 bps costs, best of "
        f"{3 if args.quick else 5} runs; the floor is buy-and-hold over the same closes "
        f"(`np.cumprod` of close ratios: {rows[0]['floor_seconds'] * 1e3:.2f} ms). "
        "Timed: run_backtest with its metrics and the trades as numpy columns; the list of trade dicts is"
        " rendered on first access to `result.trades` (`to_json()`), timed on its own below the table.",
        "",
        "| signals, stops | trades | run_backtest (ms) | × floor | target (1M bars) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['trades']:,} | {r['seconds'] * 1e3:.0f} | {r['ratio']:.0f}× | "
            f"< {TARGET_S * 1e3:.0f} ms |"
        )
    render = ", ".join(
        f"{r['render_seconds'] * 1e3:.0f} ms for {r['trades']:,}" for r in rows if r["render_seconds"] is not None
    )
    lines += ["", f"Rendering `result.trades` (one dict per trade, on first access; GC on): {render} trades."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
