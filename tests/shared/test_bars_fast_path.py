"""`shared.bars` reads a well-formed batch through its fast column path and anything else through the checked
loop: both give the same bars, and what the fast path cannot take still gets the loop's message."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bars import (
    _FAST_BODY,
    BarValidationError,
    _columns_checked,
    _columns_fast,
    bars_from_body,
    bars_from_items,
    bars_from_payload,
    bars_to_rows,
    parse_json,
)
from shared.errors import AppError
from shared.timeframes import Timeframe
from tests.data import generate_bars

H1 = Timeframe("H1")


def _items(n: int = 300) -> list[dict[str, Any]]:
    return orjson.loads(orjson.dumps(bars_to_rows(generate_bars("H1", n, seed=21))))  # type: ignore[no-any-return]


def test_the_fast_path_reads_the_same_columns_as_the_checked_loop() -> None:
    items = _items()
    items[5]["volume"] = 1000  # ints are numbers too
    fast = _columns_fast(items)
    assert fast is not None
    checked = _columns_checked(items)
    assert fast[1] == checked[1]
    for f in ("open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(fast[0][f], checked[0][f])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(close=True), "bar 7: close must be a number, got bool"),
        (lambda b: b.update(high="1.5"), "bar 7: high must be a number, got str"),
        (lambda b: b.pop("low"), "bar 7: missing field low"),
        (lambda b: b.update(open=None), "bar 7: missing field open"),
        (lambda b: b.update(volume=10**400), "bar 7: volume is too large for a number"),
    ],
)
def test_what_the_fast_path_cannot_take_gets_the_loops_message(change: Any, message: str) -> None:
    items = _items()
    change(items[7])
    assert _columns_fast(items) is None
    with pytest.raises(BarValidationError) as exc:
        bars_from_items(items, H1)
    assert message in str(exc.value)


def test_a_bar_that_is_not_an_object_or_has_no_ts_is_named() -> None:
    items: list[Any] = _items()
    items[3] = [1, 2, 3]
    assert _columns_fast(items) is None
    with pytest.raises(BarValidationError, match="bar 3: must be an object"):
        bars_from_items(items, H1)
    items = _items()
    del items[4]["ts"]
    assert _columns_fast(items) is None
    with pytest.raises(BarValidationError, match="bar 4"):
        bars_from_items(items, H1)


# bars_from_body (typed msgspec decoding) against the general path on the same bytes: every body gives the same
# bars in the same order, or the same error with the same message.
_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=0.5, max_value=2.0),
    st.integers(min_value=-3, max_value=3),
    st.just(10**400),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.just([1.0]),
)
_TOKENS = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "true", '"x"', "null", "2", "-0.0"])


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    items: list[Any] = _items(draw(st.integers(min_value=1, max_value=30))) if draw(st.booleans()) else []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        if not items:
            break
        i = draw(st.integers(min_value=0, max_value=len(items) - 1))
        field = draw(st.sampled_from(["ts", "open", "high", "low", "close", "volume", "extra"]))
        action = draw(st.sampled_from(["set", "drop", "not an object", "ts as epoch", "swap"]))
        if action == "not an object":
            items[i] = draw(st.sampled_from([[1, 2], "bar", 3, None]))
        elif not isinstance(items[i], dict):
            continue
        elif action == "set":
            items[i][field] = draw(_VALUES)
        elif action == "drop":
            items[i].pop(field, None)
        elif action == "ts as epoch":
            items[i]["ts"] = draw(st.sampled_from([1_700_000_000, 1_700_000_001, 2**70, -(2**70)]))
        else:
            j = draw(st.integers(min_value=0, max_value=len(items) - 1))
            items[i]["ts"] = items[j]["ts"] if isinstance(items[j], dict) else 0
    body = json.dumps(draw(st.sampled_from([{"bars": items}, {"bars": items, "symbol": "X"}, items, {"bar": items}])))
    if draw(st.booleans()) and '"open": ' in body:  # a raw token in place of a number: not JSON, or not a number
        body = body.replace('"open": ', f'"open": {draw(_TOKENS)}, "was": ', 1)
    return body.encode()


def _outcome(f: Any) -> Any:
    try:
        bars, order = f()
    except AppError as exc:
        return type(exc).__name__, exc.message
    return [getattr(bars, f).tolist() for f in ("ts", "open", "high", "low", "close", "volume")], order


@settings(max_examples=300, deadline=None)
@given(body=_bodies(), max_bars=st.sampled_from([5, 50]))
def test_the_typed_decoder_gives_what_the_general_path_gives(body: bytes, max_bars: int) -> None:
    fast = _outcome(lambda: bars_from_body(body, H1, max_bars))
    general = _outcome(lambda: bars_from_payload(parse_json(body), H1, max_bars))
    assert fast == general


def test_the_usual_body_takes_the_typed_decoder() -> None:
    """The property above holds either way if the fast path never runs: show that it does."""
    body = orjson.dumps({"bars": _items(40)})
    assert len(_FAST_BODY.decode(body).bars) == 40
    bars, _ = bars_from_body(body, H1, 50)
    assert len(bars) == 40
