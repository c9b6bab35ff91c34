"""shared/timeframes.py directly: timeframe and symbol rules, bar alignment, closed bars, and resampling to a
higher timeframe (docs/INDICATORS.md, "Higher timeframes and no look-ahead"): completed bars only, and a bar
after t never changes a resampled bar that closed by t."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ValidationFailed
from shared.timeframes import (
    OHLCV,
    TIMEFRAMES,
    Timeframe,
    can_resample,
    check_symbol,
    parse_timeframe,
    resample,
)

FIELDS = ("ts", "open", "high", "low", "close", "volume")
UNIT_SECONDS = {"M": 60, "H": 3600, "D": 86_400, "W": 7 * 86_400}
# 1800-01-01 (the first bar the ingest rules accept) to 2242: negative epochs exercise the weekly anchor too.
EPOCHS = st.integers(-5_364_662_400, 2**33)


def _utc(iso: str) -> int:
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp())


def _equal(a: OHLCV, b: OHLCV) -> bool:
    return len(a) == len(b) and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def _bars(ts: list[int], closes: list[float] | None = None) -> OHLCV:
    """Bars at `ts` whose values say which bar they are: open = index, close = index + 0.5 (or `closes`)."""
    n = len(ts)
    idx = np.arange(n, dtype=np.float64)
    close = np.asarray(closes, dtype=np.float64) if closes is not None else idx + 0.5
    return OHLCV(np.asarray(ts, dtype=np.int64), idx, idx + 10, idx - 10, close, np.ones(n))


# --- timeframes and symbols ---------------------------------------------------------------------------------


def test_timeframe_seconds_follow_their_names() -> None:
    for tf in TIMEFRAMES:
        assert tf.seconds == int(tf.value[1:]) * UNIT_SECONDS[tf.value[0]], tf


@pytest.mark.parametrize("value", [t.value for t in TIMEFRAMES])
def test_every_timeframe_parses(value: str) -> None:
    assert parse_timeframe(value) is Timeframe(value)


@pytest.mark.parametrize("value", ["h1", "M2", "1H", "", " H1", "D1 ", "MN1"])
def test_an_unknown_timeframe_is_422_listing_the_known_ones(value: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_timeframe(value)
    assert info.value.status_code == 422
    assert info.value.message == f"unknown timeframe {value!r}; expected one of M1, M5, M15, M30, H1, H4, D1, W1"


@pytest.mark.parametrize("symbol", ["EURUSD", "SPX", "BRK.B", "ES_F", "BTC-USD", "0700", "A", "A" * 20])
def test_good_symbols_pass_unchanged(symbol: str) -> None:
    assert check_symbol(symbol) == symbol


@pytest.mark.parametrize("symbol", ["eurusd", "EUR/USD", "EUR USD", "", "A" * 21, "\x00", "ÄPFEL", "SPX;DROP"])
def test_a_bad_symbol_is_422_naming_the_pattern(symbol: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        check_symbol(symbol)
    assert info.value.status_code == 422
    assert info.value.message == f"bad symbol {symbol!r}: must match ^[A-Z0-9._-]{{1,20}}$"


def test_a_symbol_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValidationFailed):
        check_symbol("EURUSD\n")


@settings(max_examples=200)
@given(st.text(alphabet=st.sampled_from("AZ09._-az /\x00É"), max_size=24))
def test_check_symbol_accepts_exactly_the_documented_pattern(symbol: str) -> None:
    # "\n" is left out of the alphabet: test_a_symbol_with_a_trailing_newline_is_refused holds that case.
    ok = re.fullmatch(r"[A-Z0-9._-]{1,20}", symbol) is not None
    if ok:
        assert check_symbol(symbol) == symbol
    else:
        with pytest.raises(ValidationFailed):
            check_symbol(symbol)


# --- alignment ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tf", "opens_at"),
    [
        (Timeframe.M1, "2020-09-13T12:37:00"),
        (Timeframe.M15, "2020-09-13T12:30:00"),
        (Timeframe.H1, "2020-09-13T12:00:00"),
        (Timeframe.H4, "2020-09-13T12:00:00"),
        (Timeframe.D1, "2020-09-13T00:00:00"),
        (Timeframe.W1, "2020-09-07T00:00:00"),  # 2020-09-13 is a Sunday: its week opened on Monday the 7th
    ],
)
def test_floor_gives_the_open_time_of_the_bar_containing_a_moment(tf: Timeframe, opens_at: str) -> None:
    moment = np.array([_utc("2020-09-13T12:37:10")], dtype=np.int64)
    assert tf.floor(moment).tolist() == [_utc(opens_at)]
    assert not tf.is_aligned(moment)[0] and tf.is_aligned(tf.floor(moment))[0]


@given(ts=st.lists(EPOCHS, min_size=1, max_size=20), tf=st.sampled_from(TIMEFRAMES))
def test_floor_is_the_latest_aligned_time_at_or_before(ts: list[int], tf: Timeframe) -> None:
    t = np.asarray(ts, dtype=np.int64)
    f = tf.floor(t)
    assert ((f <= t) & (t < f + tf.seconds)).all()
    assert np.array_equal(tf.floor(f), f)
    assert tf.is_aligned(f).all()
    assert np.array_equal(tf.is_aligned(t), f == t)


@given(ts=EPOCHS)
def test_weekly_bars_open_on_monday_midnight_utc(ts: int) -> None:
    opened = datetime.fromtimestamp(int(Timeframe.W1.floor(np.array([ts], dtype=np.int64))[0]), UTC)
    assert (opened.weekday(), opened.hour, opened.minute, opened.second) == (0, 0, 0, 0)
    assert timedelta(0) <= datetime.fromtimestamp(ts, UTC) - opened < timedelta(days=7)


# --- OHLCV windows and closed bars --------------------------------------------------------------------------


def test_windows_tail_and_until() -> None:
    h = Timeframe.H1.seconds
    bars = _bars([0, h, 2 * h, 3 * h])
    assert bars.tail(2).ts.tolist() == [2 * h, 3 * h]
    assert bars.tail(10).ts.tolist() == bars.ts.tolist()
    assert bars.window(1, 3).open.tolist() == [1.0, 2.0]
    assert bars.until(2 * h).ts.tolist() == [0, h]  # exclusive
    assert bars.until(2 * h + 1).ts.tolist() == [0, h, 2 * h]
    assert len(OHLCV.empty()) == 0 and OHLCV.empty().ts.dtype == np.int64


@given(
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=30),
    tf=st.sampled_from(TIMEFRAMES),
    now_offset=st.floats(-2.0, 40.0),
)
def test_closed_keeps_exactly_the_bars_that_closed_by_now(steps: list[int], tf: Timeframe, now_offset: float) -> None:
    ts = (np.cumsum(steps) * tf.seconds).astype(np.int64)
    bars = _bars(ts.tolist())
    now = now_offset * tf.seconds  # fractional seconds included: `now` is time.time()
    kept = bars.closed(tf, now)
    assert kept.ts.tolist() == [t for t in ts.tolist() if t + tf.seconds <= now]


# --- resampling ---------------------------------------------------------------------------------------------


def test_resampling_aggregates_first_max_min_last_sum() -> None:
    h = Timeframe.H1.seconds
    day = _utc("2024-01-02T00:00:00")
    b = _bars([day + i * h for i in range(8)])
    high = np.array([5, 9, 7, 6, 1, 2, 8, 3.0])
    low = np.array([0, -1, 2, 1, 3, 0.5, 4, 2.0])
    b = OHLCV(b.ts, b.open, high, low, b.close, np.arange(1, 9, dtype=np.float64))
    out = resample(b, Timeframe.H1, Timeframe.H4)
    assert out.ts.tolist() == [day, day + 4 * h]
    assert out.open.tolist() == [0.0, 4.0]
    assert out.high.tolist() == [9.0, 8.0]
    assert out.low.tolist() == [-1.0, 0.5]
    assert out.close.tolist() == [3.5, 7.5]
    assert out.volume.tolist() == [10.0, 26.0]


def test_the_bar_still_forming_is_left_out() -> None:
    h = Timeframe.H1.seconds
    day = _utc("2024-01-02T00:00:00")
    # 00:00-06:00: the 04:00 H4 bar has three of four hours and nothing after it
    assert resample(_bars([day + i * h for i in range(7)]), Timeframe.H1, Timeframe.H4).ts.tolist() == [day]
    # a gap inside the last group does not matter once its last hour (07:00, closing 08:00) is there
    ts = [day + i * h for i in (0, 1, 2, 3, 4, 7)]
    assert resample(_bars(ts), Timeframe.H1, Timeframe.H4).ts.tolist() == [day, day + 4 * h]
    # a group with missing hours is complete once a later group has a bar
    ts = [day + i * h for i in (0, 2, 9)]
    out = resample(_bars(ts), Timeframe.H1, Timeframe.H4)
    assert out.ts.tolist() == [day] and out.close.tolist() == [1.5]
    # one base bar, still inside its target bar
    assert len(resample(_bars([day]), Timeframe.H1, Timeframe.D1)) == 0


def test_a_week_of_weekday_bars_appears_once_the_next_week_starts() -> None:
    monday = _utc("2024-01-01T00:00:00")  # a Monday
    d = Timeframe.D1.seconds
    weekdays = [monday + i * d for i in range(5)]
    assert len(resample(_bars(weekdays), Timeframe.D1, Timeframe.W1)) == 0  # Friday closes before the week does
    out = resample(_bars([*weekdays, monday + 7 * d]), Timeframe.D1, Timeframe.W1)
    assert out.ts.tolist() == [monday] and out.open.tolist() == [0.0] and out.close.tolist() == [4.5]
    full_week = [monday + i * d for i in range(7)]
    assert resample(_bars(full_week), Timeframe.D1, Timeframe.W1).ts.tolist() == [monday]


def test_same_timeframe_and_empty_bars_come_back_as_they_are() -> None:
    b = _bars([0, 3600])
    assert resample(b, Timeframe.H1, Timeframe.H1) is b
    assert len(resample(OHLCV.empty(), Timeframe.H1, Timeframe.D1)) == 0


@pytest.mark.parametrize(("base", "target"), [(Timeframe.H1, Timeframe.M30), (Timeframe.W1, Timeframe.D1)])
def test_a_lower_target_is_422(base: Timeframe, target: Timeframe) -> None:
    assert not can_resample(base, target)
    with pytest.raises(ValidationFailed) as info:
        resample(_bars([0, 604_800]), base, target)
    assert info.value.message == f"cannot build {target.value} bars from {base.value} bars"
    assert info.value.status_code == 422


def test_every_timeframe_builds_every_higher_one() -> None:
    # each timeframe's length divides every longer one's (W1 = 7 D1 = 42 H4 ...)
    for base in TIMEFRAMES:
        for target in TIMEFRAMES:
            assert can_resample(base, target) == (target.seconds >= base.seconds), (base, target)


PAIRS = [
    (Timeframe.M1, Timeframe.M5),
    (Timeframe.M5, Timeframe.M15),
    (Timeframe.M15, Timeframe.H1),
    (Timeframe.M30, Timeframe.H4),
    (Timeframe.H1, Timeframe.H4),
    (Timeframe.H1, Timeframe.D1),
    (Timeframe.H4, Timeframe.D1),
    (Timeframe.H4, Timeframe.W1),
    (Timeframe.D1, Timeframe.W1),
]


@st.composite
def _series(draw: st.DrawFn) -> tuple[Timeframe, Timeframe, OHLCV]:
    """Base bars with gaps (1 to 4 base intervals apart), integer-valued so sums are exact."""
    base, target = draw(st.sampled_from(PAIRS))
    n = draw(st.integers(1, 120))
    steps = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    start = int(base.floor(np.array([draw(st.integers(-5_000_000_000, 1_700_000_000))], dtype=np.int64))[0])
    ts = start + np.cumsum(np.asarray(steps, dtype=np.int64)) * base.seconds
    values = st.lists(st.integers(1, 10_000), min_size=n, max_size=n)
    o, h, lo, c, v = (np.asarray(draw(values), dtype=np.float64) for _ in range(5))
    return base, target, OHLCV(ts, o, h, lo, c, v)


def _reference(bars: OHLCV, base: Timeframe, target: Timeframe) -> OHLCV:
    """resample's documented rule, written out bar by bar with datetime for the week."""

    def opens(t: int) -> int:
        if target is Timeframe.W1:
            day = datetime.fromtimestamp(t, UTC).replace(hour=0, minute=0, second=0)
            return int((day - timedelta(days=day.weekday())).timestamp())
        return t - t % target.seconds

    groups: dict[int, list[int]] = {}
    for i, t in enumerate(bars.ts.tolist()):
        groups.setdefault(opens(t), []).append(i)
    keys = sorted(groups)
    if int(bars.ts[-1]) + base.seconds != keys[-1] + target.seconds:
        keys = keys[:-1]  # the newest group is still forming
    rows = [
        (k, bars.open[g[0]], bars.high[g].max(), bars.low[g].min(), bars.close[g[-1]], bars.volume[g].sum())
        for k in keys
        for g in [groups[k]]
    ]
    if not rows:
        return OHLCV.empty()
    ts, o, h, lo, c, v = zip(*rows, strict=True)
    return OHLCV(np.asarray(ts, dtype=np.int64), *(np.asarray(x, dtype=np.float64) for x in (o, h, lo, c, v)))


@settings(max_examples=100, deadline=None)
@given(series=_series())
def test_resample_matches_the_documented_rule(series: tuple[Timeframe, Timeframe, OHLCV]) -> None:
    base, target, bars = series
    out = resample(bars, base, target)
    assert _equal(out, _reference(bars, base, target))
    assert target.is_aligned(out.ts).all()


@settings(max_examples=100, deadline=None)
@given(series=_series(), data=st.data())
def test_only_completed_bars_no_look_ahead(series: tuple[Timeframe, Timeframe, OHLCV], data: st.DataObject) -> None:
    """At any time t: every resampled bar built from the bars closed by t has closed by t; it never changes
    when later bars arrive; and changing every bar that opens at or after t changes no resampled bar that
    closed by t."""
    base, target, bars = series
    t = data.draw(st.integers(int(bars.ts[0]), int(bars.ts[-1]) + 2 * target.seconds))

    seen = resample(bars.closed(base, t), base, target)
    assert (seen.ts + target.seconds <= t).all()
    full = resample(bars, base, target)
    assert _equal(seen, full.window(0, len(seen)))

    k = int(np.searchsorted(bars.ts, t, side="left"))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))

    def changed(col: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # above every original value (1 to 10,000), so a changed bar always changes its group's volume
        return np.concatenate([col[:k], rng.integers(20_000, 30_000, len(col) - k).astype(np.float64)])

    future = OHLCV(bars.ts, *(changed(getattr(bars, f)) for f in FIELDS[1:]))
    after = resample(future, base, target)
    assert np.array_equal(after.ts, full.ts)
    done = int((full.ts + target.seconds <= t).sum())
    assert _equal(after.window(0, done), full.window(0, done))
    # The rows that hold a changed bar (from the target bar containing the first bar at or after t on) all
    # changed; the rows before them did not: the comparison above is not vacuous.
    first_changed = int(target.floor(bars.ts[k : k + 1])[0]) if k < len(bars) else 2**62
    touched = full.ts >= first_changed
    assert (after.volume[touched] != full.volume[touched]).all()
    unchanged = int((~touched).sum())
    assert _equal(after.window(0, unchanged), full.window(0, unchanged))
