"""shared/bars.py directly: every ingest rule and its message (docs/INDICATORS.md, "Validation"), parsing,
sorting, and the round trip with bars_to_rows. The same rules over HTTP are in tests/indicators/test_routes.py."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bars import (
    MIN_TS,
    BarValidationError,
    bars_from_items,
    bars_from_payload,
    bars_to_rows,
    parse_json,
)
from shared.errors import PayloadTooLarge, ValidationFailed
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars

Row = dict[str, Any]


def _rows(n: int = 30, timeframe: str = "H1") -> list[Row]:
    return bars_to_rows(generate_bars(timeframe, n, seed=9))


def _refusal(items: list[Any], timeframe: Timeframe = Timeframe.H1) -> BarValidationError:
    with pytest.raises(BarValidationError) as info:
        bars_from_items(items, timeframe)
    return info.value


def _equal(a: OHLCV, b: OHLCV) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("ts", "open", "high", "low", "close", "volume"))


# --- body shape ---------------------------------------------------------------------------------------------


def test_non_json_tokens_are_parsed_so_the_bar_can_be_named() -> None:
    body = parse_json(b'{"bars": [{"close": NaN, "high": Infinity, "low": -Infinity}]}')
    bar = body["bars"][0]
    assert np.isnan(bar["close"]) and bar["high"] == float("inf") and bar["low"] == float("-inf")


@pytest.mark.parametrize("body", [b"{", b"", b"\xff\xfe", b'{"bars": [1,]}'])
def test_a_body_that_is_not_json_is_refused(body: bytes) -> None:
    with pytest.raises(ValidationFailed, match="^body is not valid JSON: ") as info:
        parse_json(body)
    assert info.value.status_code == 422


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], 'body must be a JSON object {"bars": [...]}'),
        ({"rows": []}, 'body must be a JSON object {"bars": [...]}'),
        ({"bars": {"ts": 0}}, "bars must be a list"),
        ({"bars": []}, "bars is empty"),
    ],
)
def test_body_shape_errors_say_what_is_expected(raw: Any, message: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        bars_from_payload(raw, Timeframe.H1, max_bars=10)
    assert info.value.message == message and info.value.status_code == 422


def test_more_bars_than_the_limit_are_413_with_both_counts() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        bars_from_payload({"bars": _rows(11)}, Timeframe.H1, max_bars=10)
    assert info.value.status_code == 413
    assert info.value.message == "11 bars in one request; the limit is 10"
    bars, _ = bars_from_payload({"bars": _rows(10)}, Timeframe.H1, max_bars=10)
    assert len(bars) == 10


# --- one rule each, with the message it gives ---------------------------------------------------------------


def _set(i: int, **values: Any) -> Callable[[list[Row]], None]:
    return lambda rows: rows[i].update(values)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.__setitem__(2, [1, 2]), "bar 2: must be an object"),
        (lambda r: r[10].pop("close"), "bar 10: missing field close"),
        (_set(11, close="1.5"), "bar 11: close must be a number, got str"),
        # JSON true is not a number, though Python's bool is an int
        (_set(12, volume=True), "bar 12: volume must be a number, got bool"),
        (_set(15, close=10**400), "bar 15: close is too large for a number"),
        (_set(17, close=float("nan")), "bar 17: close is nan; must be a finite number"),
        (_set(3, volume=float("inf")), "bar 3: volume is inf; must be a finite number"),
        # every rule a bar breaks is named (a price <= 0 also breaks low <= min(open, close) unless low is too)
        (_set(4, open=-1.0, low=-1.0), "bar 4: open -1.0 must be > 0; bar 4: low -1.0 must be > 0"),
        (_set(4, close=0, low=0), "bar 4: low 0.0 must be > 0; bar 4: close 0.0 must be > 0"),
        (
            _set(4, open=-1.0, high=2.0, low=1.0, close=1.5),
            "bar 4: open -1.0 must be > 0; bar 4: low 1.0 > min(open, close) -1.0",
        ),
        (_set(5, open=2.0, close=3.0, high=2.5, low=1.0), "bar 5: high 2.5 < max(open, close) 3.0"),
        (_set(6, open=2.0, close=3.0, high=4.0, low=2.5), "bar 6: low 2.5 > min(open, close) 2.0"),
        (_set(7, volume=-5.0), "bar 7: volume -5.0 must be >= 0"),
        (
            _set(8, ts="2020-09-13T12:30:00Z"),
            "bar 8: ts 2020-09-13T12:30:00Z is not aligned to H1 (a bar opens at 2020-09-13T12:00:00Z)",
        ),
        (_set(12, ts="yesterday"), "bar 12: ts 'yesterday' is not an ISO 8601 timestamp"),
        (
            _set(13, ts="2020-09-14T01:00:00.5Z"),
            "bar 13: ts '2020-09-14T01:00:00.5Z' has fractional seconds; bars open on whole seconds",
        ),
        (_set(0, ts=None), "bar 0: ts must be an ISO 8601 string or epoch seconds, got None"),
        (_set(1, ts=1.6e9), "bar 1: ts must be an ISO 8601 string or epoch seconds, got 1600000000.0"),
        (_set(9, ts=-6_000_000_000), "bar 9: ts -6000000000 is out of range (epoch seconds from 1800 on)"),
        (_set(9, ts=2**41), f"bar 9: ts {2**41} is out of range (epoch seconds from 1800 on)"),
    ],
)
def test_each_rule_names_the_bar_the_field_and_the_rule(mutate: Callable[[list[Row]], None], message: str) -> None:
    rows = _rows()
    mutate(rows)
    err = _refusal(rows)
    assert err.message == message
    assert err.status_code == 422 and err.code == "validation_error"


@pytest.mark.parametrize("ts", ["1799-12-31T00:00:00Z", "2300-01-01T00:00:00Z", "2999-01-01T00:00:00Z"])
def test_bars_open_between_1800_and_now(ts: str) -> None:
    err = _refusal([{"ts": ts, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0}], Timeframe.D1)
    assert re.fullmatch(
        rf"bar 0: ts {ts} is out of range: bars open from 1800 until now \(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)",
        err.message,
    )


def test_bars_from_the_first_second_of_1800_to_today_are_accepted() -> None:
    # today's bar is still forming: it is stored (and enters no feature until it closes)
    today = int(Timeframe.D1.floor(np.array([int(time.time())], dtype=np.int64))[0])
    one = {"open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0}
    bars, _ = bars_from_items([{"ts": "1800-01-01T00:00:00Z", **one}, {"ts": today, **one}], Timeframe.D1)
    assert bars.ts.tolist() == [MIN_TS, today]


def test_a_duplicate_timestamp_names_both_bars_as_sent() -> None:
    rows = _rows()
    rows[9]["ts"] = rows[2]["ts"]
    assert _refusal(rows).message == f"bar 9: duplicate timestamp {rows[2]['ts']} (also bar 2)"


def test_several_errors_are_joined_and_the_rest_counted() -> None:
    rows = _rows()
    for i in (1, 2, 3):
        rows[i]["close"] = float("nan")
    for i in (4, 5, 6):
        rows[i]["volume"] = float("-inf")
    err = _refusal(rows)
    assert len(err.errors) == 6
    assert err.message == "; ".join(err.errors[:5]) + " (and 1 more)"
    assert err.errors[0] == "bar 1: close is nan; must be a finite number"
    assert err.errors[-1] == "bar 6: volume is -inf; must be a finite number"


def test_zero_volume_and_a_flat_bar_are_valid() -> None:
    rows = _rows(3)
    rows[1].update(open=2.0, high=2.0, low=2.0, close=2.0, volume=0)
    bars, _ = bars_from_items(rows, Timeframe.H1)
    assert bars.volume[1] == 0.0 and bars.high[1] == bars.low[1] == 2.0


# --- timestamps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts",
    [
        "2020-09-13T12:00:00Z",
        "2020-09-13T12:00:00",  # no offset: UTC
        "2020-09-13T14:00:00+02:00",
        "2020-09-13T08:00:00-04:00",
        "2020-09-13T12:00:00.000Z",  # zero fraction: a whole second
        1_599_998_400,
    ],
)
def test_iso_8601_with_any_offset_and_epoch_seconds_give_the_same_open_time(ts: str | int) -> None:
    row = {"ts": ts, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 0.0}
    bars, _ = bars_from_items([row], Timeframe.H1)
    assert bars.ts.tolist() == [1_599_998_400]


def test_epoch_seconds_and_strings_may_be_mixed_in_one_batch() -> None:
    rows = _rows(4)
    expected, _ = bars_from_items(rows, Timeframe.H1)
    rows[1]["ts"] = int(expected.ts[1])
    rows[3]["ts"] = int(expected.ts[3])
    got, _ = bars_from_items(rows, Timeframe.H1)
    assert _equal(got, expected)


# --- properties ---------------------------------------------------------------------------------------------


@st.composite
def _valid_bars(draw: st.DrawFn) -> tuple[Timeframe, OHLCV]:
    """Valid bars of a timeframe, with gaps, from 1800 to 2024, prices from 0.01 to 2e7."""
    tf = draw(st.sampled_from([Timeframe.M1, Timeframe.H1, Timeframe.D1, Timeframe.W1]))
    n = draw(st.integers(1, 40))
    price = st.floats(0.01, 1e6, allow_nan=False, allow_infinity=False)
    frac = st.floats(0.0, 0.9)
    opens = np.array(draw(st.lists(price, min_size=n, max_size=n)))
    closes = np.array(draw(st.lists(price, min_size=n, max_size=n)))
    up = np.array(draw(st.lists(frac, min_size=n, max_size=n)))
    down = np.array(draw(st.lists(frac, min_size=n, max_size=n)))
    volume = np.array(draw(st.lists(st.floats(0.0, 1e12), min_size=n, max_size=n)))
    steps = np.array(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)), dtype=np.int64)
    start = int(tf.floor(np.array([draw(st.integers(MIN_TS, 1_600_000_000))], dtype=np.int64))[0])
    ts = start + np.cumsum(steps) * tf.seconds
    high = np.maximum(opens, closes) * (1 + up)
    low = np.minimum(opens, closes) * (1 - down)
    return tf, OHLCV(ts, opens, high, low, closes, volume)


@settings(max_examples=60, deadline=None)
@given(tf_bars=_valid_bars(), data=st.data())
def test_valid_bars_survive_the_wire_in_any_order(tf_bars: tuple[Timeframe, OHLCV], data: st.DataObject) -> None:
    """JSON out (bars_to_rows, orjson) and back in (parse_json, bars_from_payload) is the identity; the order
    returned maps each sorted bar to its index in the request."""
    tf, bars = tf_bars
    rows = bars_to_rows(bars)
    shuffled = data.draw(st.permutations(range(len(rows))))
    body = orjson.dumps({"bars": [rows[i] for i in shuffled]})
    got, order = bars_from_payload(parse_json(body), tf, max_bars=50_000)
    assert _equal(got, bars)
    assert [shuffled[k] for k in order] == list(range(len(rows)))


@settings(max_examples=60, deadline=None)
@given(tf_bars=_valid_bars(), data=st.data())
def test_one_bad_bar_refuses_the_batch_and_is_named_by_its_index_as_sent(
    tf_bars: tuple[Timeframe, OHLCV], data: st.DataObject
) -> None:
    tf, bars = tf_bars
    rows = bars_to_rows(bars)
    perm = data.draw(st.permutations(range(len(rows))))
    shuffled = [rows[j] for j in perm]
    i = data.draw(st.integers(0, len(rows) - 1))
    shuffled[i] = dict(shuffled[i], high=max(bars.open[perm[i]], bars.close[perm[i]]) * 0.5)
    message = _refusal(shuffled, tf).message
    assert message.startswith(f"bar {i}: high ")
