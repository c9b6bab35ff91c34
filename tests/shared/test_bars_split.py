"""Streamed ingest reads a body piece by piece (`split_body`, `sorted_piece`). Whatever it accepts, the whole-body
path (`bars_from_body`) accepts too, with the same bars: a piece cut anywhere, a body of any shape, never lets
through a batch the whole-body rules refuse, nor changes a bar."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bars import bars_from_body, bars_to_rows, sorted_piece, split_body
from shared.errors import AppError
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars
from tests.shared.test_bars_fast_path import _bodies

H1 = Timeframe("H1")
FIELDS = ("ts", "open", "high", "low", "close", "volume")


def _streamed(body: bytes, piece_bytes: int) -> OHLCV | None:
    """What the streamed path would write: every piece in order, or None where it hands the body on whole."""
    pieces = split_body(body, piece_bytes)
    if pieces is None:
        return None
    read: list[OHLCV] = []
    for piece in pieces:
        bars = sorted_piece(piece, H1, int(read[-1].ts[-1]) if read else None)
        if bars is None:
            return None
        read.append(bars)
    return OHLCV(*(np.concatenate([getattr(b, f) for b in read]) for f in FIELDS))


def _columns(bars: OHLCV) -> list[list[Any]]:
    return [getattr(bars, f).tolist() for f in FIELDS]


@st.composite
def _tricky(draw: st.DrawFn) -> bytes:
    """Valid batches in time order, some with one bar made odd in a way a cut could hide: a `ts` holding "},"
    or "]", an extra nested field, a trailing comma, another layout of the JSON."""
    rows: list[Any] = bars_to_rows(generate_bars("H1", draw(st.integers(min_value=2, max_value=40)), seed=5))
    i = draw(st.integers(min_value=0, max_value=len(rows) - 1))
    odd = draw(st.sampled_from(["none", "ts", "nested", "trailing comma", "swap"]))
    if odd == "ts":
        rows[i]["ts"] = draw(st.sampled_from(['2020-01-01T00:00:00Z"},{"ts":"', "},", "]}", '"},{']))
    elif odd == "nested":
        rows[i]["extra"] = {"a": [1, {"b": 2}]}
    elif odd == "swap" and i:
        rows[i - 1], rows[i] = rows[i], rows[i - 1]
    layout = draw(st.sampled_from(["orjson", "json", "indent"]))
    body = (
        orjson.dumps({"bars": rows})
        if layout == "orjson"
        else json.dumps({"bars": rows}, indent=2 if layout == "indent" else None).encode()
    )
    if odd == "trailing comma":
        body = body.rstrip()[:-1].rstrip()[:-1].rstrip() + b",]}"
    return body


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(_bodies(), _tricky()), piece_bytes=st.integers(min_value=1, max_value=800))
def test_what_the_streamed_path_accepts_the_whole_path_accepts_unchanged(body: bytes, piece_bytes: int) -> None:
    streamed = _streamed(body, piece_bytes)
    if streamed is None:
        return
    try:
        whole, _ = bars_from_body(body, H1, 10_000)
    except AppError as exc:
        raise AssertionError(f"streamed path took a body the whole path refuses: {exc.message}") from None
    assert _columns(streamed) == _columns(whole)


def test_a_usual_body_is_cut_at_bars_and_streamed_whole() -> None:
    """The property above holds if nothing is ever streamed: show that the usual bodies are, in every layout."""
    bars = generate_bars("H1", 200, seed=6)
    rows = bars_to_rows(bars)
    for body in (orjson.dumps({"bars": rows}), json.dumps({"bars": rows}, indent=1).encode()):
        pieces = split_body(body, 1024)
        assert pieces is not None and len(pieces) > 10
        streamed = _streamed(body, 1024)
        assert streamed is not None and _columns(streamed) == _columns(bars)
    # One piece's worth, another key, or no object: read whole.
    assert split_body(orjson.dumps({"bars": rows[:3]}), 1024) is None
    assert split_body(orjson.dumps({"bars": rows, "symbol": "X"}), 1024) is None
    assert split_body(orjson.dumps(rows), 1024) is None
