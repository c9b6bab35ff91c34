"""The vectorised backtester: hand-computed trades on tiny series, a bar-by-bar reference simulator as an
oracle, properties (costs, mirror, no look-ahead, solvency), CSV signals, parameters, JSON and the plot."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.trainer.backtest import (
    EXIT_REASONS,
    BacktestParams,
    BacktestResult,
    Trades,
    align_signals,
    infer_session,
    parse_signals_csv,
    periods_per_year,
    plot_equity,
    run_backtest,
)
from shared.errors import ValidationFailed
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars

H1 = Timeframe.H1
T0 = 1_699_999_200  # an H1 bar open
OPENS = [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
CLOSES = [100.5, 101.5, 102.5, 103.5, 104.5, 105.5]


def make_bars(
    opens: list[float], closes: list[float], highs: list[float] | None = None, lows: list[float] | None = None
) -> OHLCV:
    o, c = np.array(opens, dtype=np.float64), np.array(closes, dtype=np.float64)
    h = np.array(highs, dtype=np.float64) if highs is not None else np.maximum(o, c) + 0.2
    lo = np.array(lows, dtype=np.float64) if lows is not None else np.minimum(o, c) - 0.2
    ts = T0 + np.arange(o.size, dtype=np.int64) * 3600
    return OHLCV(ts, o, h, lo, c, np.ones(o.size))


def sig(*values: int) -> npt.NDArray[np.int8]:
    return np.array(values, dtype=np.int8)


def params(**kw: Any) -> BacktestParams:
    return BacktestParams(session="24/7", **kw)


def only_trade(r: BacktestResult) -> dict[str, Any]:
    assert len(r.trades) == 1, r.trades
    return r.trades[0]


# --- hand-computed trades ---------------------------------------------------------------------------------

HALF = 0.0005  # 10 bps round trip, half at each side


def test_long_trade_fills_at_next_open_and_pays_half_the_cost_each_side() -> None:
    bars = make_bars(OPENS, CLOSES)
    r = run_backtest(
        bars, sig(1, 1, 0, 0, 0, 0), H1, params(cost_bps=4, spread_bps=3, commission_bps=2, slippage_bps=1)
    )
    t = only_trade(r)
    # BUY at bar 0's close fills at bar 1's open (101); HOLD at bar 2's close exits at bar 3's open (103).
    assert (t["entry_bar"], t["exit_bar"], t["side"], t["exit_reason"]) == (1, 3, "long", "signal")
    assert (t["entry_ts"], t["exit_ts"]) == (T0 + 3600, T0 + 3 * 3600)
    assert (t["entry_price"], t["exit_price"], t["fraction"]) == (101.0, 103.0, 1.0)
    assert t["gross_return"] == pytest.approx(2 / 101)
    assert t["cost"] == pytest.approx(HALF * (1 + 103 / 101))  # entry notional 1, exit notional 103/101
    assert t["net_return"] == pytest.approx(2 / 101 - HALF * (1 + 103 / 101))
    expected = [1.0, 1 - HALF + (101.5 / 101 - 1), 1 - HALF + (102.5 / 101 - 1)] + [1 + t["net_return"]] * 3
    np.testing.assert_allclose(r.equity, expected, rtol=1e-13)
    assert r.metrics["trades"] == 1
    assert r.metrics["exposure"] == pytest.approx(2 / 6)  # bars 1 and 2; it left at bar 3's open
    assert r.metrics["buy_and_hold_return"] == pytest.approx(105.5 / 100 - 1)
    assert r.metrics["total_return"] == pytest.approx(t["net_return"])


def test_short_trade() -> None:
    r = run_backtest(make_bars(OPENS, CLOSES), sig(-1, -1, 0, 0, 0, 0), H1, params(cost_bps=10))
    t = only_trade(r)
    assert (t["side"], t["entry_price"], t["exit_price"]) == ("short", 101.0, 103.0)
    assert t["gross_return"] == pytest.approx(-2 / 101)
    assert t["net_return"] == pytest.approx(-2 / 101 - HALF * (1 + 103 / 101))
    assert r.equity[1] == pytest.approx(1 - HALF - (101.5 / 101 - 1))
    assert r.metrics["win_rate"] == 0.0
    assert r.metrics["profit_factor"] == 0.0  # a losing trade and no winner


def test_long_only_turns_sell_into_flat() -> None:
    r = run_backtest(make_bars(OPENS, CLOSES), sig(-1, -1, 1, 0, 0, 0), H1, params(long_only=True))
    t = only_trade(r)
    assert (t["side"], t["entry_bar"], t["exit_bar"], t["entry_price"], t["exit_price"]) == ("long", 3, 4, 103, 104)
    np.testing.assert_allclose(r.equity[:3], 1.0)


def test_flip_trades_twice_the_fraction_at_one_open() -> None:
    r = run_backtest(make_bars(OPENS, CLOSES), sig(1, 1, -1, -1, 0, 0), H1, params(cost_bps=10))
    long, short = r.trades
    assert (long["exit_bar"], long["exit_price"], short["entry_bar"], short["entry_price"]) == (3, 103, 3, 103)
    assert (short["exit_bar"], short["exit_price"], short["side"]) == (5, 105, "short")
    # At bar 3's open: the long sells 103/101 of its entry notional and the short sells 1 of the new equity.
    assert long["cost"] == pytest.approx(HALF * (1 + 103 / 101))
    assert short["cost"] == pytest.approx(HALF * (1 + 105 / 103))
    e1 = 1 + 2 / 101 - HALF * (1 + 103 / 101)
    assert r.equity[3] == pytest.approx(e1 * (1 - HALF - (103.5 / 103 - 1)))
    assert r.equity[-1] == pytest.approx(e1 * (1 - 2 / 103 - HALF * (1 + 105 / 103)))
    assert r.metrics["win_rate"] == 0.5
    assert r.metrics["profit_factor"] == pytest.approx(long["net_return"] / -short["net_return"])
    assert r.metrics["average_trade"] == pytest.approx((long["net_return"] + short["net_return"]) / 2)


def test_open_trade_is_closed_at_the_last_close() -> None:
    r = run_backtest(make_bars(OPENS, CLOSES), sig(0, 0, 0, 1, 1, 1), H1, params(cost_bps=10))
    t = only_trade(r)
    assert (t["entry_bar"], t["entry_price"], t["exit_bar"], t["exit_price"]) == (4, 104, 5, 105.5)
    assert t["exit_reason"] == "end_of_data"
    assert t["net_return"] == pytest.approx(1.5 / 104 - HALF * (1 + 105.5 / 104))
    assert r.metrics["exposure"] == pytest.approx(2 / 6)


def test_risk_sizing_takes_the_entry_signals_fraction_capped() -> None:
    pf = np.array([0.25, 0.9, 0.0, 0.8, 0.0, 0.0])
    p = params(sizing="risk", max_position_fraction=0.5)
    r = run_backtest(make_bars(OPENS, CLOSES), sig(1, 1, 0, -1, 0, 0), H1, p, position_fraction=pf)
    first, second = r.trades
    assert first["fraction"] == 0.25  # the size of signal 0; signal 1's 0.9 does not resize it
    assert first["gross_return"] == pytest.approx(0.25 * 2 / 101)
    assert second["fraction"] == 0.5  # 0.8 capped
    assert second["gross_return"] == pytest.approx(-0.5 * (105 / 104 - 1))
    assert r.equity[1] == pytest.approx(1 + 0.25 * (101.5 / 101 - 1))


def test_zero_risk_fraction_means_no_trade() -> None:
    p = params(sizing="risk")
    r = run_backtest(make_bars(OPENS, CLOSES), sig(1, 1, 0, 0, 0, 0), H1, p, position_fraction=np.zeros(6))
    assert r.trades == [] and r.metrics["exposure"] == 0.0


# Stops: ATR 1 at every bar; a long entered at 101 has its stop at 99 (2 ATR) and its target at 104 (3 ATR).
ATR = np.ones(8)
STOP_OPENS = [100.0, 101.0, 101.5, 100.5, 100.8, 101.0, 102.0, 102.5]
STOP_CLOSES = [100.8, 101.4, 100.6, 100.7, 100.9, 101.8, 102.3, 102.6]


def stop_bars(**bar2: float) -> OHLCV:
    o, c = list(STOP_OPENS), list(STOP_CLOSES)
    h = [max(a, b) + 0.2 for a, b in zip(o, c, strict=True)]
    lo = [min(a, b) - 0.2 for a, b in zip(o, c, strict=True)]
    o[2], h[2], lo[2], c[2] = bar2.get("o", o[2]), bar2.get("h", h[2]), bar2.get("lo", lo[2]), bar2.get("c", c[2])
    return make_bars(o, c, h, lo)


STOPS = params(cost_bps=10, stop_atr=2.0, take_profit_atr=3.0)


def test_stop_loss_fills_at_the_stop_and_stays_flat_until_the_signal_changes() -> None:
    bars = stop_bars(lo=98.5)
    r = run_backtest(bars, sig(1, 1, 1, 0, 1, 0, 0, 0), H1, STOPS, atr=ATR)
    stopped, again = r.trades
    assert (stopped["exit_bar"], stopped["exit_price"], stopped["exit_reason"]) == (2, 99.0, "stop_loss")
    assert stopped["net_return"] == pytest.approx(-2 / 101 - HALF * (1 + 99 / 101))
    # Bar 3 still has a BUY from bar 2 but the stopped trade is not re-entered; bar 5 is a new BUY.
    assert (again["entry_bar"], again["entry_price"], again["exit_bar"], again["exit_price"]) == (5, 101, 6, 102)
    assert r.equity[2] == r.equity[3] == r.equity[4] == pytest.approx(1 + stopped["net_return"])
    assert r.metrics["exposure"] == pytest.approx(3 / 8)  # bars 1, 2 (the stop bar), 5


def test_take_profit_fills_at_the_target() -> None:
    r = run_backtest(stop_bars(h=104.5, c=104.2), sig(1, 1, 1, 0, 0, 0, 0, 0), H1, STOPS, atr=ATR)
    t = r.trades[0]
    assert (t["exit_bar"], t["exit_price"], t["exit_reason"]) == (2, 104.0, "take_profit")
    assert t["gross_return"] == pytest.approx(3 / 101)


def test_bar_touching_stop_and_target_counts_the_stop() -> None:
    r = run_backtest(stop_bars(h=105.0, lo=98.0), sig(1, 1, 1, 0, 0, 0, 0, 0), H1, STOPS, atr=ATR)
    t = r.trades[0]
    assert (t["exit_bar"], t["exit_price"], t["exit_reason"]) == (2, 99.0, "stop_loss")


def test_gap_through_the_stop_fills_at_the_open() -> None:
    r = run_backtest(stop_bars(o=97.0, h=97.5, lo=96.5, c=97.2), sig(1, 1, 1, 0, 0, 0, 0, 0), H1, STOPS, atr=ATR)
    t = r.trades[0]
    assert (t["exit_bar"], t["exit_price"], t["exit_reason"]) == (2, 97.0, "stop_loss")
    assert t["net_return"] == pytest.approx(-4 / 101 - HALF * (1 + 97 / 101))


def test_gap_through_the_target_fills_at_the_better_open() -> None:
    r = run_backtest(stop_bars(o=106.0, h=106.5, lo=105.5, c=106.2), sig(1, 1, 1, 0, 0, 0, 0, 0), H1, STOPS, atr=ATR)
    assert (r.trades[0]["exit_price"], r.trades[0]["exit_reason"]) == (106.0, "take_profit")


def test_short_stop_is_above_the_entry() -> None:
    r = run_backtest(stop_bars(h=103.5), sig(-1, -1, -1, 0, 0, 0, 0, 0), H1, STOPS, atr=ATR)
    t = r.trades[0]
    assert (t["side"], t["exit_bar"], t["exit_price"], t["exit_reason"]) == ("short", 2, 103.0, "stop_loss")
    assert t["gross_return"] == pytest.approx(-2 / 101)


def test_stop_can_hit_in_the_entry_bar() -> None:
    bars = make_bars(STOP_OPENS, STOP_CLOSES, lows=[99.0, 98.9, 100, 100, 100, 100, 101, 102])
    r = run_backtest(bars, sig(1, 1, 0, 0, 0, 0, 0, 0), H1, STOPS, atr=ATR)
    t = r.trades[0]
    assert (t["entry_bar"], t["exit_bar"], t["exit_price"]) == (1, 1, 99.0)
    assert r.equity[1] == pytest.approx(1 + t["net_return"])


def test_a_short_that_loses_everything_stops_the_account() -> None:
    bars = make_bars([100, 100, 300, 300, 300], [100, 250, 300, 300, 300])
    r = run_backtest(bars, sig(-1, -1, -1, 1, 1), H1, params())
    t = only_trade(r)  # the later BUY never trades: nothing is left
    assert (t["exit_bar"], t["exit_price"], t["exit_reason"]) == (1, 250.0, "ruin")
    np.testing.assert_array_equal(r.equity, [1, 0, 0, 0, 0])
    assert r.metrics["total_return"] == -1.0 and r.metrics["max_drawdown"] == 1.0


def test_trade_table_columns_are_the_trade_dicts() -> None:
    bars = generate_bars("H1", 3000, seed=11)
    s = np.random.default_rng(11).choice(np.array([-1, 0, 1], dtype=np.int8), 3000)
    atr = np.full(3000, float(np.median(bars.high - bars.low)))
    r = run_backtest(bars, s, H1, params(cost_bps=2, stop_atr=1.0, take_profit_atr=1.5), atr=atr)
    table = r.trade_table
    assert len(table) == r.metrics["trades"] == len(r.trades) > 100
    assert r.trades is r.trades  # rendered once, then kept
    assert {EXIT_REASONS[x] for x in table.exit_reason.tolist()} >= {"signal", "stop_loss", "take_profit"}
    for name in ("entry_bar", "exit_bar", "entry_price", "exit_price", "fraction", "gross_return", "cost"):
        assert [t[name] for t in r.trades] == getattr(table, name).tolist(), name
    assert [t["net_return"] for t in r.trades] == table.net_return.tolist()
    assert [t["side"] for t in r.trades] == ["long" if x == 1 else "short" for x in table.side.tolist()]
    assert [t["exit_reason"] for t in r.trades] == [EXIT_REASONS[x] for x in table.exit_reason.tolist()]
    assert [(t["entry_ts"], t["exit_ts"]) for t in r.trades] == list(
        zip(r.ts[table.entry_bar].tolist(), r.ts[table.exit_bar].tolist(), strict=True)
    )
    # Plain Python values: the list goes to JSON and the database as it is.
    kinds = {type(v) for t in r.trades for v in t.values()}
    assert kinds == {int, float, str}
    assert r.to_json()["trades"] == r.trades
    with pytest.raises(ValueError, match="read-only"):
        table.net_return[0] = 1.0  # the cached dicts cannot go stale


def test_trades_columns_must_have_one_length() -> None:
    f, i = np.zeros(2), np.zeros(2, dtype=np.intp)
    cols: dict[str, Any] = {
        "entry_bar": i,
        "exit_bar": i,
        "side": np.ones(2, dtype=np.int8),
        "entry_price": f,
        "exit_price": f,
        "fraction": f,
        "gross_return": f,
        "cost": f,
        "net_return": np.zeros(3),
        "exit_reason": np.zeros(2, dtype=np.int8),
        "entry_ts": i,
        "exit_ts": i,
    }
    with pytest.raises(ValueError, match=r"one value per trade, got shapes .*'net_return': \(3,\)"):
        Trades(**cols)
    assert len(Trades(**{**cols, "net_return": f})) == 2


# --- metrics ----------------------------------------------------------------------------------------------


def test_drawdown_and_ratios_from_the_equity_curve() -> None:
    bars = generate_bars("H1", 3000, seed=5)
    s = np.random.default_rng(5).choice(np.array([-1, 0, 1], dtype=np.int8), 3000)
    r = run_backtest(bars, s, H1, BacktestParams(cost_bps=1, session="24/5"))
    eq = r.equity
    rets = eq[1:] / eq[:-1] - 1
    assert r.metrics["periods_per_year"] == 6240
    assert r.metrics["sharpe"] == pytest.approx(rets.mean() / rets.std(ddof=1) * math.sqrt(6240))
    downside = math.sqrt(np.mean(np.minimum(rets, 0) ** 2))
    assert r.metrics["sortino"] == pytest.approx(rets.mean() / downside * math.sqrt(6240))
    peak = np.maximum.accumulate(eq)
    np.testing.assert_allclose(r.drawdown, eq / peak - 1)
    assert r.metrics["max_drawdown"] == pytest.approx(float(np.max(1 - eq / peak)))
    # The longest stretch below a previous peak, one bar at a time.
    top, top_i, longest = -1.0, 0, 0
    for i, e in enumerate(eq):
        if e >= top:
            top, top_i = e, i
        longest = max(longest, i - top_i)
    assert r.metrics["max_drawdown_bars"] == longest
    assert r.metrics["max_drawdown_duration_seconds"] == r.metrics["max_drawdown_bars"] * 3600
    years = 3000 * 3600 / (365.25 * 86400)
    assert r.metrics["cagr"] == pytest.approx(eq[-1] ** (1 / years) - 1)


def test_max_drawdown_bars_on_a_hand_made_curve() -> None:
    # Peak at bar 1 (close 102), under water at bars 2-4, back above at bar 5.
    bars = make_bars([100, 100, 102, 101, 100, 101], [100, 102, 101, 99, 101, 103])
    r = run_backtest(bars, sig(1, 1, 1, 1, 1, 1), H1, params())
    assert r.metrics["max_drawdown"] == pytest.approx(1 - 99 / 102)
    assert r.metrics["max_drawdown_bars"] == 3
    assert r.metrics["max_drawdown_duration_seconds"] == 3 * 3600


@pytest.mark.parametrize(
    ("tf", "session", "expected"),
    [
        (Timeframe.H1, "24/5", 24 * 5 * 52),
        (Timeframe.H1, "24/7", 24 * 365),
        (Timeframe.H1, "equity", 7 * 252),
        (Timeframe.M30, "equity", 13 * 252),
        (Timeframe.H4, "equity", 2 * 252),
        (Timeframe.D1, "equity", 252),
        (Timeframe.D1, "24/5", 260),
        (Timeframe.D1, "24/7", 365),
        (Timeframe.M1, "24/5", 60 * 24 * 5 * 52),
        (Timeframe.W1, "equity", 52),
    ],
)
def test_periods_per_year(tf: Timeframe, session: str, expected: float) -> None:
    assert periods_per_year(tf, session) == pytest.approx(expected)


def test_periods_per_year_rejects_an_unknown_session() -> None:
    with pytest.raises(ValidationFailed, match="unknown session '24/6'"):
        periods_per_year(H1, "24/6")


def test_session_inferred_from_timestamps() -> None:
    every_hour = T0 + np.arange(24 * 21, dtype=np.int64) * 3600
    weekday = ((every_hour // 86400) + 3) % 7
    assert infer_session(every_hour, H1) == "24/7"
    assert infer_session(every_hour[weekday < 5], H1) == "24/5"
    hour = (every_hour % 86400) // 3600
    assert infer_session(every_hour[(weekday < 5) & (hour >= 13) & (hour <= 20)], H1) == "equity"
    days = T0 + np.arange(60, dtype=np.int64) * 86400
    assert infer_session(days[((days // 86400) + 3) % 7 < 5], Timeframe.D1) == "24/5"
    r = run_backtest(make_bars(OPENS, CLOSES), sig(0, 0, 0, 0, 0, 0), H1, BacktestParams())
    assert r.metrics["session"] == infer_session(r.ts, H1)


# --- a bar-by-bar reference simulator (the documented rules, one bar at a time) -----------------------------


def reference(
    bars: OHLCV, s: npt.NDArray[np.int8], p: BacktestParams, atr: npt.NDArray[np.float64] | None
) -> tuple[npt.NDArray[np.float64], list[tuple[int, int, int, float, str, float]]]:
    o, h, lo, c = bars.open, bars.high, bars.low, bars.close
    n, half, f = len(bars), p.round_trip_cost / 2, p.max_position_fraction
    equity = np.empty(n)
    trades: list[tuple[int, int, int, float, str, float]] = []
    flat_equity, pos, prev_target = 1.0, 0, 0
    entry = e0 = stop = take = 0.0
    entry_bar = 0

    def close_trade(i: int, price: float, why: str) -> None:
        nonlocal flat_equity, pos
        net = f * pos * (price / entry - 1) - f * half * (1 + price / entry)
        trades.append((entry_bar, i, pos, price, why, net))
        flat_equity, pos = e0 * (1 + net), 0

    for i in range(n):
        target = int(s[i - 1]) if i else 0
        if p.long_only and target < 0:
            target = 0
        changed, prev_target = target != prev_target, target
        if pos and changed:
            close_trade(i, o[i], "signal")
        elif pos and pos * (o[i] - stop) <= 0:
            close_trade(i, o[i], "stop_loss")
        elif pos and pos * (o[i] - take) >= 0:
            close_trade(i, o[i], "take_profit")
        if not pos and changed and target:
            pos, entry, e0, entry_bar = target, o[i], flat_equity, i
            a = atr[i - 1] if atr is not None else 0.0
            stop = entry - pos * p.stop_atr * a if p.stop_atr else -pos * math.inf
            take = entry + pos * p.take_profit_atr * a if p.take_profit_atr else pos * math.inf
        if pos and (lo[i] <= stop if pos > 0 else h[i] >= stop):
            close_trade(i, stop, "stop_loss")
        elif pos and (h[i] >= take if pos > 0 else lo[i] <= take):
            close_trade(i, take, "take_profit")
        if pos and i == n - 1:
            close_trade(i, c[i], "end_of_data")
        equity[i] = e0 * (1 - f * half + f * pos * (c[i] / entry - 1)) if pos else flat_equity
    return equity, trades


@st.composite
def markets(draw: st.DrawFn, big_moves: bool = False) -> tuple[OHLCV, npt.NDArray[np.int8], npt.NDArray[np.float64]]:
    n = draw(st.integers(2, 30))
    # Small moves cannot ruin a 1x short within 30 bars (the reference does not model ruin); big ones can.
    scale = 0.6 if big_moves else 0.01
    step = st.floats(-scale, scale, allow_nan=False)
    gaps = np.array(draw(st.lists(step, min_size=n, max_size=n)))
    moves = np.array(draw(st.lists(step, min_size=n, max_size=n)))
    wick = st.floats(0, scale / 2)
    up = np.array(draw(st.lists(wick, min_size=n, max_size=n)))
    down = np.array(draw(st.lists(wick, min_size=n, max_size=n)))
    o, c = np.empty(n), np.empty(n)
    price = 100.0
    for i in range(n):
        o[i] = price * math.exp(gaps[i])
        c[i] = o[i] * math.exp(moves[i])
        price = c[i]
    h, lo = np.maximum(o, c) * np.exp(up), np.minimum(o, c) * np.exp(-down)
    s = np.array(draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=n, max_size=n)), dtype=np.int8)
    atr = np.array(draw(st.lists(st.floats(0.1, 5.0), min_size=n, max_size=n)))
    ts = T0 + np.arange(n, dtype=np.int64) * 3600
    return OHLCV(ts, o, h, lo, c, np.ones(n)), s, atr


backtest_params = st.builds(
    BacktestParams,
    cost_bps=st.floats(0, 50),
    long_only=st.booleans(),
    max_position_fraction=st.floats(0.05, 1.0),
    stop_atr=st.none() | st.floats(0.3, 4),
    take_profit_atr=st.none() | st.floats(0.3, 6),
    session=st.just("24/7"),
)


@settings(max_examples=150, deadline=None)
@given(markets(), backtest_params)
def test_matches_the_bar_by_bar_reference(market: tuple[OHLCV, Any, Any], p: BacktestParams) -> None:
    bars, s, atr = market
    r = run_backtest(bars, s, H1, p, atr=atr)
    equity, trades = reference(bars, s, p, atr)
    np.testing.assert_allclose(r.equity, equity, rtol=1e-12, atol=1e-14)
    got = [(t["entry_bar"], t["exit_bar"], 1 if t["side"] == "long" else -1, t["exit_reason"]) for t in r.trades]
    assert got == [(a, b, side, why) for a, b, side, _, why, _ in trades]
    np.testing.assert_allclose([t["exit_price"] for t in r.trades], [x[3] for x in trades], rtol=1e-14)
    np.testing.assert_allclose([t["net_return"] for t in r.trades], [x[5] for x in trades], rtol=1e-10, atol=1e-15)


# --- properties -------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(markets(), backtest_params, st.floats(0.5, 1000))
def test_costs_never_increase_returns(market: tuple[OHLCV, Any, Any], p: BacktestParams, extra: float) -> None:
    bars, s, atr = market
    cheap = run_backtest(bars, s, H1, p, atr=atr)
    dear = run_backtest(bars, s, H1, p.model_copy(update={"slippage_bps": extra}), atr=atr)
    assert np.all(dear.equity <= cheap.equity + 1e-12)
    assert len(dear.trades) <= len(cheap.trades)  # the same trades, unless costs ruin the account sooner


@settings(max_examples=50, deadline=None)
@given(markets(), backtest_params)
def test_all_hold_is_flat(market: tuple[OHLCV, Any, Any], p: BacktestParams) -> None:
    bars, s, atr = market
    r = run_backtest(bars, np.zeros_like(s), H1, p, atr=atr)
    assert r.trades == []
    np.testing.assert_array_equal(r.equity, 1.0)
    m = r.metrics
    assert (m["trades"], m["total_return"], m["exposure"], m["max_drawdown"]) == (0, 0.0, 0.0, 0.0)
    assert math.copysign(1, m["max_drawdown"]) == 1  # type: ignore[arg-type]  # not -0.0 in the JSON
    assert m["sharpe"] is None and m["win_rate"] is None and m["profit_factor"] is None


@settings(max_examples=100, deadline=None)
@given(markets(), st.floats(0.05, 1.0))
def test_negated_signals_mirror_the_gross_returns(market: tuple[OHLCV, Any, Any], f: float) -> None:
    bars, s, _ = market
    p = params(max_position_fraction=f)
    a, b = run_backtest(bars, s, H1, p), run_backtest(bars, -s, H1, p)
    assert [(t["entry_bar"], t["exit_bar"]) for t in a.trades] == [(t["entry_bar"], t["exit_bar"]) for t in b.trades]
    for x, y in zip(a.trades, b.trades, strict=True):
        assert x["gross_return"] == -y["gross_return"]
    if len(a.trades) == 1:  # one trade from equity 1: every bar's gain is the other's loss
        np.testing.assert_allclose(np.diff(a.equity), -np.diff(b.equity), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(markets(big_moves=True), backtest_params)
def test_equity_never_negative(market: tuple[OHLCV, Any, Any], p: BacktestParams) -> None:
    bars, s, atr = market
    r = run_backtest(bars, s, H1, p.model_copy(update={"stop_atr": None, "take_profit_atr": None}), atr=atr)
    assert np.all(r.equity >= 0) and np.all(r.drawdown <= 0) and np.all(r.drawdown >= -1)
    gone = np.flatnonzero(r.equity == 0)
    if gone.size:  # ruin is final, and the last trade says so
        assert np.all(r.equity[gone[0] :] == 0) and r.trades[-1]["exit_reason"] == "ruin"


@settings(max_examples=100, deadline=None)
@given(markets(), backtest_params, st.data())
def test_no_look_ahead(market: tuple[OHLCV, Any, Any], p: BacktestParams, data: st.DataObject) -> None:
    bars, s, atr = market
    m = data.draw(st.integers(2, len(bars)))
    full = run_backtest(bars, s, H1, p, atr=atr)
    cut = run_backtest(bars.window(0, m), s[:m].copy(), H1, p, atr=atr[:m].copy())
    # Up to the bar before the cut the later bars and signals change nothing (the cut's last bar closes any
    # open trade at its close, so it may differ there).
    np.testing.assert_array_equal(full.equity[: m - 1], cut.equity[: m - 1])
    done = [t for t in full.trades if t["exit_bar"] < m - 1]
    assert done == cut.trades[: len(done)]


# --- input checks -----------------------------------------------------------------------------------------


def test_bad_inputs_are_named() -> None:
    bars = make_bars(OPENS, CLOSES)
    with pytest.raises(ValidationFailed, match=r"6 bars, got shape \(5,\)"):
        run_backtest(bars, sig(1, 0, 0, 0, 0), H1, params())
    with pytest.raises(ValidationFailed, match=r"signal at bar 2 is 2; expected -1, 0 or \+1"):
        run_backtest(bars, sig(0, 0, 2, 0, 0, 0), H1, params())
    with pytest.raises(ValidationFailed, match="integers"):
        run_backtest(bars, np.zeros(6), H1, params())  # type: ignore[arg-type]
    with pytest.raises(ValidationFailed, match="position_fraction"):
        run_backtest(bars, sig(1, 0, 0, 0, 0, 0), H1, params(sizing="risk"))
    with pytest.raises(ValidationFailed, match=r"position_fraction\[0\] is nan"):
        run_backtest(bars, sig(1, 0, 0, 0, 0, 0), H1, params(sizing="risk"), position_fraction=np.full(6, np.nan))
    with pytest.raises(ValidationFailed, match="need atr"):
        run_backtest(bars, sig(1, 0, 0, 0, 0, 0), H1, params(stop_atr=2))
    atr = np.r_[1.0, np.nan, 1, 1, 1, 1]
    with pytest.raises(ValidationFailed, match=r"atr\[1\] is nan; a trade opens on signal 1"):
        run_backtest(bars, sig(0, 1, 0, 0, 0, 0), H1, params(stop_atr=2), atr=atr)
    with pytest.raises(ValidationFailed, match="at least 2 bars, got 1"):
        run_backtest(bars.window(0, 1), sig(0), H1, params())
    bad = make_bars([100, 0, 100], [100, 100, 100])
    with pytest.raises(ValidationFailed, match="bar 1: open 0.0 is not a positive finite price"):
        run_backtest(bad, sig(0, 0, 0), H1, params())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cost_bps", 1000.5),
        ("spread_bps", -1),
        ("commission_bps", 2000),
        ("slippage_bps", float("nan")),
        ("max_position_fraction", 0),
        ("max_position_fraction", 1.01),
        ("stop_atr", 0),
        ("take_profit_atr", -1),
        ("stop_atr", float("inf")),
        ("sizing", "kelly"),
        ("session", "24/6"),
        ("leverage", 2),
    ],
)
def test_out_of_range_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        BacktestParams.model_validate({field: value})
    assert [e["loc"][0] for e in err.value.errors()] == [field]


def test_params_at_their_bounds_are_accepted() -> None:
    p = BacktestParams(cost_bps=1000, spread_bps=0, max_position_fraction=1, stop_atr=0.01)
    assert p.round_trip_cost == pytest.approx(0.1)


# --- CSV signals ------------------------------------------------------------------------------------------


def test_parse_signals_csv_accepts_header_iso_epoch_and_words() -> None:
    text = (
        "ts,signal\n"
        "2023-11-14T22:00:00Z,BUY\n"
        "\n"
        "2023-11-14T23:00:00,sell\n"
        "2023-11-15T01:00:00+01:00,Hold\n"
        f"{T0 + 3 * 3600},+1\n"
        f"{T0 + 4 * 3600}, -1\n"
        f'"{T0 + 5 * 3600}",0\n'
    )
    rows = parse_signals_csv(text)
    assert rows == [
        (T0, 1),
        (T0 + 3600, -1),
        (T0 + 7200, 0),
        (T0 + 3 * 3600, 1),
        (T0 + 4 * 3600, -1),
        (T0 + 5 * 3600, 0),
    ]
    assert parse_signals_csv(f"{T0},1") == [(T0, 1)]  # no header


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ts,signal\n" + "".join(f"{T0 + i * 3600},BUY\n" for i in range(5)) + f"{T0 + 99 * 3600},BUYY\n",
            "line 7: signal 'BUYY' is not BUY, SELL, HOLD, 1, -1 or 0",
        ),
        (f"{T0},1\n{T0 + 3600},2\n", "line 2: signal '2' is not BUY"),
        (f"{T0},1\nyesterday,1\n", "line 2: ts 'yesterday' is neither epoch seconds nor ISO-8601"),
        (f"{T0},1\n2023-13-01T00:00:00Z,1\n", "line 2: ts '2023-13-01T00:00:00Z'"),
        (f"{T0},1,0.9\n", "line 1: expected 2 fields 'ts,signal', got 3"),
        (f"{T0},1\n{T0}000,1\n", "line 2: ts .* too large for epoch seconds"),
        (f"{T0},1\n{T0 + 1},0\n{T0},0\n", "line 3: ts 2023-11-14T22:00:00Z repeats line 1"),
        ("ts,signal\n\n", "no signal rows"),
    ],
)
def test_parse_signals_csv_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValidationFailed, match=message):
        parse_signals_csv(text)


def test_align_signals_fills_missing_bars_with_flat_and_rejects_unknown_ts() -> None:
    ts = T0 + np.arange(6, dtype=np.int64) * 3600
    out = align_signals(ts, [(T0 + 3600, 1), (T0 + 4 * 3600, -1)])
    assert out.dtype == np.int8 and out.tolist() == [0, 1, 0, 0, -1, 0]
    with pytest.raises(
        ValidationFailed,
        match=r"row 2: ts 2023-11-14T22:30:00Z \(1700001000\) is not the open time of a bar .*"
        r"nearest bars: 2023-11-14T22:00:00Z and 2023-11-14T23:00:00Z",
    ):
        align_signals(ts, [(T0, 1), (T0 + 1800, 1)])
    with pytest.raises(ValidationFailed, match="nearest bars: 2023-11-15T03:00:00Z$"):
        align_signals(ts, [(T0 + 99 * 3600, 1)])


def test_csv_to_backtest_end_to_end() -> None:
    bars = make_bars(OPENS, CLOSES)
    rows = parse_signals_csv(f"ts,signal\n{T0},BUY\n{T0 + 3600},buy\n")
    r = run_backtest(bars, align_signals(bars.ts, rows), H1, params())
    assert only_trade(r)["exit_price"] == 103.0


# --- JSON and plot ----------------------------------------------------------------------------------------


def test_to_json_downsamples_and_keeps_the_extremes() -> None:
    bars = generate_bars("H1", 20_000, seed=9)
    s = np.random.default_rng(9).choice(np.array([-1, 0, 1], dtype=np.int8), 20_000)
    r = run_backtest(bars, s, H1, params(cost_bps=2))
    out = orjson.loads(orjson.dumps(r.to_json(max_points=500)))
    eq = out["equity"]
    assert 250 <= len(eq["ts"]) <= 500 and len(eq["equity"]) == len(eq["drawdown"]) == len(eq["ts"])
    assert eq["ts"] == sorted(eq["ts"]) and eq["ts"][0] == int(r.ts[0]) and eq["ts"][-1] == int(r.ts[-1])
    assert min(eq["drawdown"]) == pytest.approx(-r.metrics["max_drawdown"])  # type: ignore[operator]
    assert max(eq["equity"]) == pytest.approx(r.equity.max()) and min(eq["equity"]) == pytest.approx(r.equity.min())
    assert out["metrics"] == r.metrics and len(out["trades"]) == r.metrics["trades"]
    small = run_backtest(make_bars(OPENS, CLOSES), sig(1, 1, 0, 0, 0, 0), H1, params()).to_json()
    assert len(small["equity"]["ts"]) == 6
    with pytest.raises(ValidationFailed, match="max_points must be at least 10, got 3"):
        r.to_json(max_points=3)


def test_plot_equity_is_a_png() -> None:
    bars = generate_bars("H1", 500, seed=3)
    r = run_backtest(bars, np.ones(500, dtype=np.int8), H1, params())
    png = plot_equity(r, "SPX H1 backtest")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image as mpimg

    image = mpimg.imread(io.BytesIO(png), format="png")
    assert image.shape[:2] == (600, 1000)
