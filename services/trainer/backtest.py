"""Vectorised backtester: signals at bar closes, filled at the next bar's open, with costs, optional ATR
stop-loss / take-profit, fixed or risk-based sizing and the usual performance metrics (docs/BACKTEST.md).

Pure numpy and pydantic; matplotlib is imported inside `plot_equity` only, so the trainer API and the
predictor can import this module without it.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import ValidationFailed
from shared.timeframes import OHLCV, Timeframe

Session = Literal["24/7", "24/5", "equity"]
ExitReason = Literal["signal", "stop_loss", "take_profit", "end_of_data", "ruin"]

_BPS = 1e-4
# A regular US equity session: 09:30-16:00 New York, 6.5 h, 252 sessions a year.
_EQUITY_SESSION_S = 6.5 * 3600
_EQUITY_DAYS = 252
_SECONDS_PER_YEAR = 365.25 * 86_400
_MIN_BARS = 2
_MIN_POINTS = 10


class BacktestParams(BaseModel):
    """How signals become trades. Every figure in basis points is a round-trip figure (entry + exit)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    cost_bps: float = Field(
        0.0, ge=0, le=1000, description="Total round-trip cost in basis points, 0..1000; half at entry, half at exit"
    )
    spread_bps: float = Field(0.0, ge=0, le=1000, description="Round-trip bid/ask spread in bps, 0..1000; added")
    commission_bps: float = Field(0.0, ge=0, le=1000, description="Round-trip commission in bps, 0..1000; added")
    slippage_bps: float = Field(0.0, ge=0, le=1000, description="Round-trip slippage in bps, 0..1000; added")
    long_only: bool = Field(False, description="SELL signals go flat instead of short")
    max_position_fraction: float = Field(
        1.0, gt=0, le=1, description="Cap on |position| as a fraction of equity at entry, in (0, 1]"
    )
    sizing: Literal["fixed", "risk"] = Field(
        "fixed",
        description="fixed: every trade is max_position_fraction; risk: the caller's per-bar position_fraction "
        "of the entry signal, capped at max_position_fraction",
    )
    stop_atr: float | None = Field(
        None, gt=0, le=100, description="Stop-loss distance in ATRs from the entry price, (0, 100]; None: no stop"
    )
    take_profit_atr: float | None = Field(
        None, gt=0, le=100, description="Take-profit distance in ATRs from the entry price, (0, 100]; None: none"
    )
    session: Session | None = Field(
        None,
        description="Trading hours for annualisation: 24/7 (crypto), 24/5 (FX), equity (6.5 h x 252 days); "
        "None infers it from the bar timestamps (docs/BACKTEST.md)",
    )

    @property
    def round_trip_cost(self) -> float:
        """All cost parts together as a fraction of the traded notional, per round trip."""
        return (self.cost_bps + self.spread_bps + self.commission_bps + self.slippage_bps) * _BPS


EXIT_REASONS: tuple[ExitReason, ...] = ("signal", "stop_loss", "take_profit", "end_of_data", "ruin")
_SIDES = ("short", "long")  # indexed by side > 0; one shared str per value, not one per trade


@dataclass(frozen=True, eq=False)
class Trades:
    """The trades of a backtest as columns, one row per trade in entry order.

    `side` is +1 (long) or -1 (short); `exit_reason` indexes `EXIT_REASONS`; prices are fills, `fraction`,
    `gross_return`, `cost` and `net_return` fractions of the equity at entry; `entry_ts` / `exit_ts` epoch
    seconds as in `BacktestResult`. run_backtest hands them over read-only.
    """

    entry_bar: npt.NDArray[np.intp]
    exit_bar: npt.NDArray[np.intp]
    side: npt.NDArray[np.int8]
    entry_price: npt.NDArray[np.float64]
    exit_price: npt.NDArray[np.float64]
    fraction: npt.NDArray[np.float64]
    gross_return: npt.NDArray[np.float64]
    cost: npt.NDArray[np.float64]
    net_return: npt.NDArray[np.float64]
    exit_reason: npt.NDArray[np.int8]
    entry_ts: npt.NDArray[np.int64]
    exit_ts: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        shapes = {f.name: getattr(self, f.name).shape for f in dataclass_fields(self)}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"every Trades column needs one value per trade, got shapes {shapes}")

    def __len__(self) -> int:
        return int(self.entry_bar.shape[0])

    def to_dicts(self) -> list[dict[str, Any]]:
        """One dict per trade with plain Python values (the API's and the JSON's trade list)."""
        # One dict literal per trade: 0.8 s for 444,000 trades on the 2-core dev box against 1.9 s for
        # dict(zip(keys, row)). Pausing the cyclic GC meanwhile saved only 10-25 % there: not worth touching
        # process-wide state. This is why run_backtest keeps columns and renders on demand (docs/BACKTEST.md).
        return [
            {
                "entry_ts": t0,
                "exit_ts": t1,
                "entry_bar": b0,
                "exit_bar": b1,
                "side": sd,
                "entry_price": p0,
                "exit_price": p1,
                "fraction": f,
                "gross_return": g,
                "cost": c,
                "net_return": r,
                "exit_reason": why,
            }
            for t0, t1, b0, b1, sd, p0, p1, f, g, c, r, why in zip(
                self.entry_ts.tolist(),
                self.exit_ts.tolist(),
                self.entry_bar.tolist(),
                self.exit_bar.tolist(),
                [_SIDES[x] for x in (self.side > 0).tolist()],
                self.entry_price.tolist(),
                self.exit_price.tolist(),
                self.fraction.tolist(),
                self.gross_return.tolist(),
                self.cost.tolist(),
                self.net_return.tolist(),
                [EXIT_REASONS[x] for x in self.exit_reason.tolist()],
                strict=True,
            )
        ]


@dataclass(frozen=True)
class BacktestResult:
    """Metrics, the trades and the per-bar equity marked at each bar's close (bar i's `ts` is its open).

    `trade_table` holds the trades as numpy columns; `trades` is the same as a list of dicts, rendered on
    first use and then kept. Trades carry `entry_ts` / `exit_ts` as epoch seconds: the open time of the bar
    whose price filled the order (for a stop or take-profit, the bar in which it was hit; for
    `end_of_data`, the last bar). Returns are fractions of the equity at entry.
    """

    metrics: dict[str, float | int | str | None]
    trade_table: Trades
    ts: npt.NDArray[np.int64]
    equity: npt.NDArray[np.float64]
    drawdown: npt.NDArray[np.float64]

    @cached_property
    def trades(self) -> list[dict[str, Any]]:
        """The trades as dicts (keys in docs/BACKTEST.md); built on first access, since a million bars of
        i.i.d. signals make 444,579 of them, which takes longer than the whole backtest."""
        return self.trade_table.to_dicts()

    def to_json(self, max_points: int = 2000) -> dict[str, Any]:
        """JSON-ready dict; the equity curve downsampled to at most `max_points` points that keep each
        bucket's lowest and highest equity, the first and last bar and the deepest drawdown with its peak."""
        if max_points < _MIN_POINTS:
            raise ValidationFailed(f"max_points must be at least {_MIN_POINTS}, got {max_points}")
        idx = downsample_indices(self.equity, self.drawdown, max_points)
        return {
            "metrics": dict(self.metrics),
            "trades": self.trades,
            "equity": {
                "ts": self.ts[idx].tolist(),
                "equity": self.equity[idx].tolist(),
                "drawdown": self.drawdown[idx].tolist(),
            },
        }


def downsample_indices(
    equity: npt.NDArray[np.float64], drawdown: npt.NDArray[np.float64], max_points: int
) -> npt.NDArray[np.intp]:
    """Sorted bar indices, at most `max_points`, whose plot looks like the full curve (min/max per bucket)."""
    n = int(equity.shape[0])
    if n <= max_points:
        return np.arange(n)
    trough = int(np.argmin(drawdown))
    peak = int(np.argmax(equity[: trough + 1]))
    buckets = (max_points - 4) // 2
    size = -(-n // buckets)
    rows = -(-n // size)
    padded = np.full(rows * size, np.nan)
    padded[:n] = equity
    grid = padded.reshape(rows, size)
    base = np.arange(rows) * size
    picks = np.concatenate(
        [base + np.nanargmin(grid, axis=1), base + np.nanargmax(grid, axis=1), [0, n - 1, trough, peak]]
    )
    return np.asarray(np.unique(picks), dtype=np.intp)


# --- annualisation ----------------------------------------------------------------------------------------


def periods_per_year(timeframe: Timeframe, session: str) -> float:
    """Bars in a year of the given trading hours.

    24/7: 365 days of 24 h (crypto). 24/5: 52 weeks of 5 days of 24 h (FX; H1 = 24*5*52 = 6240).
    equity: 252 sessions of 6.5 h, intraday bars per session rounded up (a 6.5 h session prints 7 H1 bars,
    the last one half an hour long; M30 13, H4 2). W1 is 52 in every session.
    """
    if session not in ("24/7", "24/5", "equity"):
        raise ValidationFailed(f"unknown session {session!r}; expected 24/7, 24/5 or equity")
    s = timeframe.seconds
    if timeframe is Timeframe.W1:
        return 52.0
    if session == "24/7":
        return 365.0 * 86_400 / s
    if session == "24/5":
        return 52.0 * 5 * 86_400 / s
    if timeframe is Timeframe.D1:
        return float(_EQUITY_DAYS)
    return float(_EQUITY_DAYS * math.ceil(_EQUITY_SESSION_S / s))


def infer_session(ts: npt.NDArray[np.int64], timeframe: Timeframe) -> Session:
    """The trading hours the bar timestamps show (UTC).

    A bar opening on a Saturday: 24/7 (FX closes Friday 22:00 to Sunday 22:00 UTC, equity venues all
    weekend). Intraday bars that open in fewer than half of the day's time slots (hours, or H4 slots):
    equity (a regular session covers 13:30-20:00 UTC). Otherwise 24/5. Weekday-only D1/W1 bars cannot tell
    FX (260 days) from equities (252) reliably, holidays being too few in a short series: they are taken as
    24/5, the project's main market (EURUSD); pass session="equity" for stocks.
    """
    if ts.size == 0:
        return "24/5"
    weekday = ((ts // 86_400) + 3) % 7  # 1970-01-01 was a Thursday: Monday = 0
    if bool(np.any(weekday == 5)):
        return "24/7"
    if timeframe.seconds < 86_400:
        slot = max(timeframe.seconds, 3600)
        slots_per_day = 86_400 // slot
        used = np.unique((ts % 86_400) // slot).size
        if used * 2 < slots_per_day:
            return "equity"
    return "24/5"


# --- the backtest -----------------------------------------------------------------------------------------


def run_backtest(
    bars: OHLCV,
    signals: npt.NDArray[np.int8] | npt.NDArray[np.int64],
    timeframe: Timeframe,
    params: BacktestParams,
    *,
    position_fraction: npt.NDArray[np.float64] | None = None,
    atr: npt.NDArray[np.float64] | None = None,
) -> BacktestResult:
    """Trade `signals` over `bars`.

    signals[i] in {-1, 0, +1} is produced at the close of bar i and filled at the open of bar i+1 (the last
    signal is never filled). A run of equal signals is one trade (0 = flat); its fraction and stop levels
    are fixed at entry. position_fraction[i] (sizing="risk") is the size recommended with signal i;
    atr[i] (price units, known at bar i's close) sets the stops of a trade entered on signal i.
    """
    n = len(bars)
    if n < _MIN_BARS:
        raise ValidationFailed(f"a backtest needs at least {_MIN_BARS} bars, got {n}")
    sig = _check_signals(signals, n)
    _check_prices(bars)
    d = np.zeros(n, dtype=np.int8)
    d[1:] = sig[:-1]
    if params.long_only:
        d[d < 0] = 0

    # Runs of equal target direction; a nonzero run is one trade from its first bar's open.
    change = np.flatnonzero(d[1:] != d[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [n]))
    keep = d[starts] != 0
    starts, ends = starts[keep], ends[keep]
    side = d[starts].astype(np.float64)
    frac = _fractions(params, starts, n, position_fraction)
    traded = frac > 0
    starts, ends, side, frac = starts[traded], ends[traded], side[traded], frac[traded]
    entry = bars.open[starts]

    # Default exits: at the open of the bar where the signal changes, or the last close.
    at_end = ends == n
    exit_bar = np.where(at_end, n - 1, ends)
    exit_price = np.where(at_end, bars.close[n - 1], bars.open[np.minimum(ends, n - 1)])
    reason = np.where(at_end, 3, 0).astype(np.int8)  # index into EXIT_REASONS
    if params.stop_atr is not None or params.take_profit_atr is not None:
        _apply_stops(bars, params, atr, starts, ends, side, entry, exit_bar, exit_price, reason)

    half = params.round_trip_cost / 2
    ratio = exit_price / entry
    gross = frac * side * (ratio - 1.0)
    cost = frac * half * (1.0 + ratio)
    net = gross - cost
    equity, ruin = _equity(bars, starts, exit_bar, side, frac, entry, net, half)
    if ruin is not None:
        # Wiped out by trade k at close z: later trades never happen; a trade marked to zero inside its
        # life ends at that close.
        k, z = ruin
        keep_k = slice(0, k + 1)
        starts, side, frac, entry = starts[keep_k], side[keep_k], frac[keep_k], entry[keep_k]
        exit_bar, exit_price, reason = exit_bar[keep_k].copy(), exit_price[keep_k].copy(), reason[keep_k].copy()
        if z < exit_bar[k]:
            exit_bar[k], exit_price[k] = z, bars.close[z]
        reason[k] = EXIT_REASONS.index("ruin")
        ratio = exit_price / entry
        gross = frac * side * (ratio - 1.0)
        cost = frac * half * (1.0 + ratio)
        net = gross - cost

    peak = np.maximum.accumulate(equity)
    drawdown = equity / peak - 1.0
    # A trade holds its bar of exit too unless it left at that bar's open on a signal.
    held_to = np.where(reason == 0, exit_bar - 1, exit_bar)
    exposure_bars = int(np.sum(held_to - starts + 1))
    session: Session = params.session if params.session is not None else infer_session(bars.ts, timeframe)
    metrics = _metrics(bars, timeframe, session, equity, drawdown, net, exposure_bars)
    table = Trades(
        entry_bar=starts,
        exit_bar=exit_bar,
        side=side.astype(np.int8),
        entry_price=entry,
        exit_price=exit_price,
        fraction=frac,
        gross_return=gross,
        cost=cost,
        net_return=net,
        exit_reason=reason,
        entry_ts=bars.ts[starts],
        exit_ts=bars.ts[exit_bar],
    )
    for f in dataclass_fields(table):
        # Ours alone (fancy-indexed copies or fresh results, no caller's array), so freezing them is safe; it
        # keeps the cached dict list from going stale.
        getattr(table, f.name).flags.writeable = False
    return BacktestResult(metrics=metrics, trade_table=table, ts=bars.ts, equity=equity, drawdown=drawdown)


def _check_signals(signals: npt.NDArray[Any], n: int) -> npt.NDArray[np.int8]:
    s = np.asarray(signals)
    if s.shape != (n,):
        raise ValidationFailed(f"signals must have one value per bar: {n} bars, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.integer):
        raise ValidationFailed(f"signals must be integers -1, 0 or +1, got dtype {s.dtype}")
    bad = np.flatnonzero((s < -1) | (s > 1))
    if bad.size:
        raise ValidationFailed(f"signal at bar {int(bad[0])} is {int(s[bad[0]])}; expected -1, 0 or +1")
    return s.astype(np.int8, copy=False)


def _check_prices(bars: OHLCV) -> None:
    for name in ("open", "close"):
        values: npt.NDArray[np.float64] = getattr(bars, name)
        bad = np.flatnonzero(~(values > 0) | ~np.isfinite(values))
        if bad.size:
            raise ValidationFailed(f"bar {int(bad[0])}: {name} {values[bad[0]]} is not a positive finite price")


def _fractions(
    params: BacktestParams, starts: npt.NDArray[np.intp], n: int, position_fraction: npt.NDArray[np.float64] | None
) -> npt.NDArray[np.float64]:
    if params.sizing == "fixed":
        return np.full(starts.shape, params.max_position_fraction)
    if position_fraction is None:
        raise ValidationFailed('sizing="risk" needs position_fraction, one size per bar (the size of signal i)')
    pf = np.asarray(position_fraction, dtype=np.float64)
    if pf.shape != (n,):
        raise ValidationFailed(f"position_fraction must have one value per bar: {n} bars, got shape {pf.shape}")
    f = pf[starts - 1]  # the size recommended with the signal that opens the trade
    bad = np.flatnonzero(~np.isfinite(f) | (f < 0))
    if bad.size:
        i = int(starts[bad[0]] - 1)
        raise ValidationFailed(f"position_fraction[{i}] is {pf[i]}; a trade opens on signal {i}: need a value >= 0")
    return np.minimum(f, params.max_position_fraction)


def _apply_stops(
    bars: OHLCV,
    params: BacktestParams,
    atr: npt.NDArray[np.float64] | None,
    starts: npt.NDArray[np.intp],
    ends: npt.NDArray[np.intp],
    side: npt.NDArray[np.float64],
    entry: npt.NDArray[np.float64],
    exit_bar: npt.NDArray[np.intp],
    exit_price: npt.NDArray[np.float64],
    reason: npt.NDArray[np.int8],
) -> None:
    """First stop or take-profit hit of each trade, in place. Vectorised over all bars of all trades: one
    pass of comparisons and a reduceat, no loop (benchmarks/bench_backtest.py)."""
    n = len(bars)
    if atr is None:
        raise ValidationFailed("stop_atr / take_profit_atr need atr, one ATR in price units per bar")
    a_all = np.asarray(atr, dtype=np.float64)
    if a_all.shape != (n,):
        raise ValidationFailed(f"atr must have one value per bar: {n} bars, got shape {a_all.shape}")
    if starts.size == 0:
        return
    a = a_all[starts - 1]
    bad = np.flatnonzero(~np.isfinite(a) | (a <= 0))
    if bad.size:
        i = int(starts[bad[0]] - 1)
        raise ValidationFailed(
            f"atr[{i}] is {a_all[i]}; a trade opens on signal {i} and its stops need a positive finite ATR"
        )
    stop = entry - side * (params.stop_atr * a) if params.stop_atr is not None else np.full_like(entry, np.nan)
    take = (
        entry + side * (params.take_profit_atr * a)
        if params.take_profit_atr is not None
        else np.full_like(entry, np.nan)
    )

    lengths = ends - starts
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    trade = np.repeat(np.arange(starts.size), lengths)
    bar = np.arange(trade.size) - offsets[trade] + starts[trade]
    s, st, tp = side[trade], stop[trade], take[trade]
    o, hi, lo = bars.open[bar], bars.high[bar], bars.low[bar]
    later = bar != starts[trade]  # the entry bar opens at the entry price: no gap to check there
    long = s > 0
    # NaN levels (stop or target not set) compare False everywhere.
    gap_sl = later & (s * (o - st) <= 0)
    gap_tp = later & (s * (o - tp) >= 0)
    hit_sl = np.where(long, lo <= st, hi >= st)
    hit_tp = np.where(long, hi >= tp, lo <= tp)
    hit = gap_sl | gap_tp | hit_sl | hit_tp
    pos = np.where(hit, np.arange(trade.size), trade.size)
    first = np.minimum.reduceat(pos, offsets)
    stopped = np.flatnonzero(first < trade.size)
    if stopped.size == 0:
        return
    j = first[stopped]
    # Gaps fill at the open; inside a bar that touches both levels the stop is assumed hit first.
    price = np.where(gap_sl[j], o[j], np.where(gap_tp[j], o[j], np.where(hit_sl[j], st[j], tp[j])))
    why = np.where(gap_sl[j] | (~gap_tp[j] & hit_sl[j]), 1, 2).astype(np.int8)
    exit_bar[stopped] = bar[j]
    exit_price[stopped] = price
    reason[stopped] = why


def _equity(
    bars: OHLCV,
    starts: npt.NDArray[np.intp],
    exit_bar: npt.NDArray[np.intp],
    side: npt.NDArray[np.float64],
    frac: npt.NDArray[np.float64],
    entry: npt.NDArray[np.float64],
    net: npt.NDArray[np.float64],
    half: float,
) -> tuple[npt.NDArray[np.float64], tuple[int, int] | None]:
    """Equity at every close, starting at 1.0. A trade holds its units from entry to exit (no rebalancing):
    at a close inside trade k, equity = E_k * (1 - f*c/2 + f*side*(close/entry - 1)), E_k its entry equity.

    Equity cannot fall below zero: the first close at which it would is the ruin (trade, bar); from there
    on equity is 0 and nothing more is traded."""
    n = len(bars)
    after = np.cumprod(np.maximum(1.0 + net, 0.0))
    before = np.concatenate(([1.0], after[:-1]))
    done = np.cumsum(np.bincount(exit_bar, minlength=n))  # trades realised by each close
    equity = np.concatenate(([1.0], after))[done]
    lengths = exit_bar - starts  # closes held inside each trade: its entry bar .. the bar before its exit
    mark_ruin: tuple[int, int] | None = None
    if int(lengths.sum()):
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        trade = np.repeat(np.arange(starts.size), lengths)
        bar = np.arange(trade.size) - offsets[trade] + starts[trade]
        f = frac[trade]
        marks = before[trade] * (1.0 - f * half + f * side[trade] * (bars.close[bar] / entry[trade] - 1.0))
        equity[bar] = marks
        neg = np.flatnonzero(marks <= 0)
        if neg.size:
            mark_ruin = (int(trade[neg[0]]), int(bar[neg[0]]))
    bust = np.flatnonzero(after <= 0)
    realised_ruin = (int(bust[0]), int(exit_bar[bust[0]])) if bust.size else None
    candidates = [r for r in (realised_ruin, mark_ruin) if r is not None]
    if not candidates:
        return equity, None
    # The earlier bar; on a tie the realised loss came first (it wiped out the next trade's entry equity).
    k, z = min(candidates, key=lambda r: (r[1], r is mark_ruin))
    equity[z:] = 0.0
    return equity, (k, z)


def _metrics(
    bars: OHLCV,
    timeframe: Timeframe,
    session: Session,
    equity: npt.NDArray[np.float64],
    drawdown: npt.NDArray[np.float64],
    net: npt.NDArray[np.float64],
    exposure_bars: int,
) -> dict[str, float | int | str | None]:
    n = int(equity.size)
    ppy = periods_per_year(timeframe, session)
    prev = equity[:-1]
    rets = np.divide(equity[1:], prev, out=np.ones_like(prev), where=prev > 0) - 1.0
    mean = float(rets.mean())
    sd = float(rets.std(ddof=1)) if rets.size > 1 else 0.0
    downside = float(np.sqrt(np.mean(np.minimum(rets, 0.0) ** 2)))
    sharpe = mean / sd * math.sqrt(ppy) if sd > 0 else None
    sortino = mean / downside * math.sqrt(ppy) if downside > 0 else None

    final = float(equity[-1])
    years = (int(bars.ts[-1]) + timeframe.seconds - int(bars.ts[0])) / _SECONDS_PER_YEAR
    cagr: float | None
    if final <= 0:
        cagr = -1.0
    else:
        try:
            cagr = math.exp(math.log(final) / years) - 1.0
        except OverflowError:
            cagr = None  # a short, strongly positive run: the annual figure is meaningless

    # Underwater length: bars (and seconds) since the running peak, longest over the series.
    idx = np.arange(n)
    peak_idx = np.maximum.accumulate(np.where(drawdown >= 0, idx, 0))
    under_bars = int(np.max(idx - peak_idx))
    under_s = int(np.max(bars.ts - bars.ts[peak_idx]))

    wins = net[net > 0]
    losses = net[net < 0]
    trades = int(net.size)
    return {
        "total_return": final - 1.0,
        "cagr": _finite(cagr),
        "sharpe": _finite(sharpe),
        "sortino": _finite(sortino),
        "max_drawdown": float(0.0 - drawdown.min()),  # 0.0, not -0.0, when never under water
        "max_drawdown_bars": under_bars,
        "max_drawdown_duration_seconds": under_s,
        "win_rate": wins.size / trades if trades else None,
        "profit_factor": float(wins.sum() / -losses.sum()) if losses.size else None,
        "trades": trades,
        "exposure": exposure_bars / n,
        "average_trade": float(net.mean()) if trades else None,
        "buy_and_hold_return": float(bars.close[-1] / bars.open[0] - 1.0),
        "bars": n,
        "periods_per_year": ppy,
        "session": session,
    }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# --- signals from a CSV upload ----------------------------------------------------------------------------

_SIGNAL_WORDS = {"buy": 1, "sell": -1, "hold": 0, "1": 1, "+1": 1, "-1": -1, "0": 0}
# Epoch seconds beyond this (year 5138) are taken to be milliseconds sent by mistake.
_MAX_EPOCH_S = 10**11


def parse_signals_csv(text: str) -> list[tuple[int, int]]:
    """Rows `ts,signal` in file order. ts: ISO-8601 (no zone = UTC) or epoch seconds; signal: BUY/SELL/HOLD
    or 1/-1/0, any case. A first row whose ts field has no digit is a header. Blank lines are skipped.
    Errors raise ValidationFailed naming the line."""
    rows: list[tuple[int, int]] = []
    seen: dict[int, int] = {}
    reader = csv.reader(io.StringIO(text))
    first = True
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if first:
            first = False
            if not any(ch.isdigit() for ch in fields[0]):
                continue
        if len(fields) != 2:
            raise ValidationFailed(f"line {line}: expected 2 fields 'ts,signal', got {len(fields)}")
        ts = _parse_ts(fields[0].strip(), line)
        raw = fields[1].strip()
        sig = _SIGNAL_WORDS.get(raw.lower())
        if sig is None:
            raise ValidationFailed(f"line {line}: signal {raw!r} is not BUY, SELL, HOLD, 1, -1 or 0")
        if ts in seen:
            raise ValidationFailed(f"line {line}: ts {_iso(ts)} repeats line {seen[ts]}")
        seen[ts] = line
        rows.append((ts, sig))
    if not rows:
        raise ValidationFailed("no signal rows: expected lines 'ts,signal', e.g. '2024-01-02T00:00:00Z,BUY'")
    return rows


def _parse_ts(raw: str, line: int) -> int:
    if raw.lstrip("+-").isdigit():
        value = int(raw)
        if abs(value) >= _MAX_EPOCH_S:
            raise ValidationFailed(f"line {line}: ts {raw} is too large for epoch seconds (milliseconds?)")
        return value
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise ValidationFailed(
            f"line {line}: ts {raw!r} is neither epoch seconds nor ISO-8601 (e.g. 2024-01-02T15:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def align_signals(bars_ts: npt.NDArray[np.int64], rows: list[tuple[int, int]]) -> npt.NDArray[np.int8]:
    """One signal per bar from `(ts, signal)` rows; a bar without a row is flat (0): a gap in the file never
    keeps a position open. A ts that is not a bar's open time raises ValidationFailed naming it."""
    out = np.zeros(bars_ts.shape[0], dtype=np.int8)
    if not rows:
        return out
    ts = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    sig = np.fromiter((r[1] for r in rows), dtype=np.int8, count=len(rows))
    pos = np.searchsorted(bars_ts, ts)
    clipped = np.minimum(pos, max(bars_ts.shape[0] - 1, 0))
    ok = (pos < bars_ts.shape[0]) & (bars_ts[clipped] == ts) if bars_ts.size else np.zeros(ts.shape, bool)
    bad = np.flatnonzero(~ok)
    if bad.size:
        i = int(bad[0])
        t = int(ts[i])
        if bars_ts.size == 0:
            raise ValidationFailed(f"row {i + 1}: ts {_iso(t)} ({t}) has no bar: the series has no bars")
        before = bars_ts[pos[i] - 1] if pos[i] > 0 else None
        after = bars_ts[pos[i]] if pos[i] < bars_ts.size else None
        near = " and ".join(_iso(int(b)) for b in (before, after) if b is not None)
        raise ValidationFailed(
            f"row {i + 1}: ts {_iso(t)} ({t}) is not the open time of a bar of the series "
            f"({_iso(int(bars_ts[0]))} .. {_iso(int(bars_ts[-1]))}); nearest bars: {near}"
        )
    out[pos] = sig
    return out


# --- plot -------------------------------------------------------------------------------------------------


def plot_equity(result: BacktestResult, title: str) -> bytes:
    """PNG of the equity curve with the drawdown underneath (matplotlib, Agg backend, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    idx = downsample_indices(result.equity, result.drawdown, 4000)
    when = result.ts[idx].astype("datetime64[s]")
    fig = Figure(figsize=(10, 6), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot(when, result.equity[idx], color="tab:blue", linewidth=1)
    top.axhline(1.0, color="grey", linewidth=0.5)
    top.set_ylabel("equity (start = 1)")
    top.set_title(title)
    top.grid(alpha=0.3)
    bottom.fill_between(when, result.drawdown[idx] * 100, 0, color="tab:red", alpha=0.4, linewidth=0)
    bottom.set_ylabel("drawdown %")
    bottom.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
