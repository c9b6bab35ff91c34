"""`shared.bars` reads a well-formed batch through its fast column path and anything else through the checked
loop: both give the same bars, and what the fast path cannot take still gets the loop's message."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from shared.bars import BarValidationError, _columns_checked, _columns_fast, bars_from_items, bars_to_rows
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
