"""Parsing and validation of client-sent bars: the one set of rules for ingest and for predictions.

Bodies of up to 50,000 bars are checked column-wise with numpy, every ingest rule in less time than pydantic
model validation of the same body takes to check types and signs only. Ingest decodes the usual body with
msgspec into typed structs (`bars_from_body`), anything else with orjson (`parse_json`, `bars_from_payload`):
the same rules and messages either way. 50,000 bars: 34.6 ms typed, 61.2 ms through orjson, 88.2 ms for
pydantic (benchmarks/bench_stack.py, alternating rounds, 2026-12-04). A batch with any invalid bar is refused whole,
with a message naming the bar index, the field and the rule. Large ingest bodies are also read piece by piece
while they are written (`split_body`, `sorted_piece`): the same rules, and whatever that accepts `bars_from_body`
accepts with the same bars.
"""

from __future__ import annotations

import json
import math
import operator
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import PayloadTooLarge, ValidationFailed
from shared.timeframes import OHLCV, Timeframe

FIELDS = ("open", "high", "low", "close", "volume")


class Bar(BaseModel):
    """One OHLCV bar. `ts` is the bar's open time (ISO 8601, UTC if no offset; or epoch seconds)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "ts": "2024-01-02T00:00:00Z",
                "open": 1.1,
                "high": 1.2,
                "low": 1.0,
                "close": 1.15,
                "volume": 1000.0,
            }
        }
    )

    # Documentation only (the routes read bars with bars_from_items): what that accepts. MIN_TS below; 2**40.
    ts: datetime | Annotated[int, Field(ge=-5_364_662_400, le=1_099_511_627_776)]
    open: float = Field(gt=0)
    high: float = Field(gt=0)
    low: float = Field(gt=0)
    close: float = Field(gt=0)
    volume: float = Field(ge=0)


class BarsIn(BaseModel):
    """Request body of bar uploads: up to 50,000 bars; order does not matter (they are sorted)."""

    bars: list[Bar] = Field(min_length=1, max_length=50_000, description="MAX_BARS_PER_REQUEST, 50,000 by default")


class BarValidationError(ValidationFailed):
    def __init__(self, errors: list[str]) -> None:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__("; ".join(errors[:5]) + more)
        self.errors = errors
        self.batch_size: int | None = None  # bars in the refused batch, where the check knows it


def _reject_constant(token: str) -> float:
    # NaN/Infinity tokens are not JSON, but clients send them: parse them so the check below names the bar.
    return float(token.lower().replace("infinity", "inf"))


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationFailed(f"body is not valid JSON: {exc}") from None


def _fmt(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else str(x)


def bars_from_payload(raw: Any, timeframe: Timeframe, max_bars: int) -> tuple[OHLCV, list[int]]:
    """Validate a decoded `{"bars": [...]}` body; return columnar bars sorted by time.

    Also returns, for each sorted bar, its index in the request, so messages can name what the client sent.
    """
    if not isinstance(raw, dict) or "bars" not in raw:
        raise ValidationFailed('body must be a JSON object {"bars": [...]}')
    items = raw["bars"]
    if not isinstance(items, list):
        raise ValidationFailed("bars must be a list")
    if len(items) > max_bars:
        raise PayloadTooLarge(f"{len(items)} bars in one request; the limit is {max_bars}")
    if not items:
        raise ValidationFailed("bars is empty")
    return bars_from_items(items, timeframe)


# gc=False: the structs hold only str, int and float (no cycles), so the collector need not track them: 50,000
# tracked objects per body otherwise set off collections while they are made.
class _FastBar(msgspec.Struct, gc=False):
    # 64-bit: orjson (the general path) reads a larger integer as a float, and says so
    ts: str | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
    open: float
    high: float
    low: float
    close: float
    volume: float


class _FastBody(msgspec.Struct, gc=False):
    bars: list[_FastBar]


# The usual body decoded straight into typed structs: no dict per bar, and the types checked in C. 50,000 bars
# (7.4 MB) with every rule: 34.6 ms against 61.2 ms for orjson's dicts and `_columns_fast` (bench_stack, 2026-12-04).
_FAST_BODY = msgspec.json.Decoder(_FastBody)
_FAST_TS = operator.attrgetter("ts")
_FAST_FIELDS = {f: operator.attrgetter(f) for f in FIELDS}


def _typed_columns(items: list[Any]) -> dict[str, npt.NDArray[np.float64]]:
    return {f: np.fromiter(map(get, items), dtype=np.float64, count=len(items)) for f, get in _FAST_FIELDS.items()}


def bars_from_body(body: bytes, timeframe: Timeframe, max_bars: int) -> tuple[OHLCV, list[int]]:
    """`bars_from_payload(parse_json(body), ...)`, faster for the usual body: a JSON object whose `bars` are
    objects with every field, numbers (not bool) for prices and volume and a string or an integer `ts`. Any
    other body, or one of those with too many bars, takes the general path, which names what is wrong; both
    then apply the same rules (`_validated`)."""
    try:
        items = _FAST_BODY.decode(body).bars
    except msgspec.MsgspecError:
        items = []
    if not items or len(items) > max_bars:
        return bars_from_payload(parse_json(body), timeframe, max_bars)
    n = len(items)
    cols = _typed_columns(items)
    try:
        return _validated(cols, list(map(_FAST_TS, items)), timeframe)
    except BarValidationError as exc:
        exc.batch_size = n
        raise


# Streamed ingest (services/indicators/service.py): a large body is cut into pieces at bar boundaries, each decoded
# and checked while PostgreSQL is still writing the one before it. Only for the usual body of bars sent in time
# order; anything else, or a piece that breaks a rule, goes through `bars_from_body` whole, which names what is wrong.
# No JSON library reads a document piece by piece into typed structs, hence the cut by hand; it is what takes a
# 50,000-bar request from 57 % to 92-95 % of a bare binary COPY of its rows (bench_indicators, three runs on
# 2026-12-04: one before, two after).
_PIECE = msgspec.json.Decoder(list[_FastBar])
_BODY_HEAD = re.compile(rb'\s*\{\s*"bars"\s*:\s*\[')
_BODY_TAIL = re.compile(rb"\]\s*\}\s*$")


def split_body(body: bytes, piece_bytes: int) -> list[bytes] | None:
    """The bars of a body `{"bars": [...]}` (that key alone) as JSON arrays of about `piece_bytes` each, cut
    after a bar's closing brace; None for a body of another shape or one that makes a single piece.

    A cut can only fall inside a bar where a string holds "}," (a bar with a nested object, or such a `ts`):
    the piece before it then ends inside the string or the object and does not decode, so the body is read
    whole, never cut into other bars."""
    head = _BODY_HEAD.match(body)
    # The end looked for in the last 64 bytes only: searched from the start, it costs 1.8 ms on 7.4 MB.
    tail = _BODY_TAIL.search(body, max(len(body) - 64, 0))
    if head is None or tail is None or tail.start() - head.end() < 2 * piece_bytes:
        return None
    pieces = []
    view = memoryview(body)
    start, end = head.end(), tail.start()
    while (cut := body.find(b"},", start + piece_bytes, end)) >= 0:
        pieces.append(b"".join((b"[", view[start : cut + 1], b"]")))
        start = cut + 2  # past the comma: a comma just before the end leaves "[]", which is refused
    pieces.append(b"".join((b"[", view[start:end], b"]")))
    return pieces if len(pieces) > 1 else None


def sorted_piece(piece: bytes, timeframe: Timeframe, after: int | None) -> OHLCV | None:
    """The bars of one piece when they pass every ingest rule and each opens after the one before it (the first
    after epoch second `after`); None otherwise: the caller then reads the body whole with `bars_from_body`,
    which names the bar and the rule (or sorts bars sent out of order)."""
    try:
        items = _PIECE.decode(piece)
    except msgspec.MsgspecError:
        return None
    n = len(items)
    if not n:
        return None
    cols = _typed_columns(items)
    try:
        ts = _parse_timestamps(list(map(_FAST_TS, items)))
    except BarValidationError:
        return None
    if _check_values(cols, ts, timeframe):
        return None
    if (after is not None and ts[0] <= after) or (n > 1 and not (ts[1:] > ts[:-1]).all()):
        return None
    return OHLCV(ts, *(cols[f] for f in FIELDS))


_GET_TS = operator.itemgetter("ts")
_GETTERS = {f: operator.itemgetter(f) for f in FIELDS}
_NUMBER_TYPES = frozenset({float, int})


def _columns_fast(items: list[Any]) -> tuple[dict[str, npt.NDArray[np.float64]], list[Any]] | None:
    """The columns and raw timestamps at C speed (map, set, np.array; no Python loop per bar) when every bar is
    an object with every field and every number a float or an int (bool is not): the usual batch, in about
    half the loop's time. None otherwise, and the loop in `bars_from_items` names what is wrong."""
    try:
        raw_ts = list(map(_GET_TS, items))
        cols = {}
        for f, get in _GETTERS.items():
            values = list(map(get, items))
            if not set(map(type, values)) <= _NUMBER_TYPES:
                return None
            cols[f] = np.array(values, dtype=np.float64)
    except (KeyError, TypeError, OverflowError):
        return None
    return cols, raw_ts


def bars_from_items(items: list[Any], timeframe: Timeframe) -> tuple[OHLCV, list[int]]:
    try:
        fast = _columns_fast(items)
        if fast is not None:
            cols, raw_ts = fast
        else:
            cols, raw_ts = _columns_checked(items)
        return _validated(cols, raw_ts, timeframe)
    except BarValidationError as exc:
        exc.batch_size = len(items)
        raise


def _columns_checked(items: list[Any]) -> tuple[dict[str, npt.NDArray[np.float64]], list[Any]]:
    errors: list[str] = []
    n = len(items)
    cols: dict[str, npt.NDArray[np.float64]] = {f: np.empty(n, dtype=np.float64) for f in FIELDS}
    raw_ts: list[Any] = [None] * n
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            errors.append(f"bar {i}: must be an object")
            continue
        raw_ts[i] = item.get("ts")
        for f in FIELDS:
            v = item.get(f)
            if type(v) is float or type(v) is int:
                try:
                    cols[f][i] = v
                except OverflowError:
                    errors.append(f"bar {i}: {f} is too large for a number")
            elif v is None:
                errors.append(f"bar {i}: missing field {f}")
            else:
                errors.append(f"bar {i}: {f} must be a number, got {type(v).__name__}")
        if len(errors) > 20:
            break
    if errors:
        raise BarValidationError(errors)
    return cols, raw_ts


def _validated(
    cols: dict[str, npt.NDArray[np.float64]], raw_ts: list[Any], timeframe: Timeframe
) -> tuple[OHLCV, list[int]]:
    ts = _parse_timestamps(raw_ts)
    errors = _check_values(cols, ts, timeframe)
    if errors:
        raise BarValidationError(errors)

    order = np.argsort(ts, kind="stable")
    ts_sorted = ts[order]
    dup = np.flatnonzero(ts_sorted[1:] == ts_sorted[:-1])
    if dup.size:
        msgs = [
            f"bar {int(order[k + 1])}: duplicate timestamp {_iso(int(ts_sorted[k]))} (also bar {int(order[k])})"
            for k in dup[:5]
        ]
        raise BarValidationError(msgs)
    bars = OHLCV(ts_sorted, *(cols[f][order] for f in FIELDS))
    return bars, order.tolist()


def bars_to_rows(bars: OHLCV) -> list[dict[str, object]]:
    """Bars as JSON-ready objects, `ts` in ISO 8601 UTC: what the API returns and accepts."""
    stamps = np.datetime_as_string(bars.ts.astype("datetime64[s]"), unit="s").tolist()
    columns = (bars.open.tolist(), bars.high.tolist(), bars.low.tolist(), bars.close.tolist(), bars.volume.tolist())
    return [
        {"ts": f"{t}Z", "open": o, "high": h, "low": lo, "close": c, "volume": v}
        for t, o, h, lo, c, v in zip(stamps, *columns, strict=True)
    ]


def _iso(epoch_s: int) -> str:
    # numpy's datetime64 spans any epoch second a client can send (pandas stops at 2262)
    return f"{np.datetime_as_string(np.datetime64(epoch_s, 's'))}Z"


# Bars may open from 1800 on (long equity histories) and never in the future: a bar that opens after now
# has not happened, and storing one would make its series look fresh forever.
MIN_TS = -5_364_662_400  # 1800-01-01T00:00:00Z


def _parse_timestamps(raw: list[Any]) -> npt.NDArray[np.int64]:
    """Epoch seconds of each bar. Fractional seconds are refused, never truncated."""
    if all(type(v) is int for v in raw):
        if all(MIN_TS <= v <= 2**40 for v in raw):
            return np.asarray(raw, dtype=np.int64)
    elif all(isinstance(v, str) for v in raw):
        try:
            parsed = pd.to_datetime(pd.Series(raw, dtype=object), utc=True, format="ISO8601")
            ns = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").astype(np.int64)
            if not (ns % 1_000_000_000).any():
                return ns // 1_000_000_000
        except (ValueError, TypeError, OverflowError):
            pass
    # Something is off: find the bar and say what.
    out = np.empty(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        out[i] = _one_timestamp(i, v)
    return out


# What the batch parser (pd.to_datetime, format="ISO8601") reads: a date, optionally a time with optional fractional
# seconds, optionally a UTC offset; nothing else (ASCII digits only: \d would admit other scripts' digits).
_ISO_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}(:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?)?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?"
)


def _one_timestamp(i: int, v: Any) -> int:
    if type(v) is int:
        if not MIN_TS <= v <= 2**40:
            raise BarValidationError([f"bar {i}: ts {v} is out of range (epoch seconds from 1800 on)"])
        return v
    if not isinstance(v, str):
        raise BarValidationError([f"bar {i}: ts must be an ISO 8601 string or epoch seconds, got {v!r}"])
    # pd.Timestamp alone is lenient (dateutil): it reads "13/09/2020" and skips NUL bytes and other junk.
    if not _ISO_RE.fullmatch(v):
        raise BarValidationError([f"bar {i}: ts {v!r} is not an ISO 8601 timestamp"])
    try:
        t = pd.Timestamp(v)
        t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    except (ValueError, TypeError, OverflowError):
        raise BarValidationError([f"bar {i}: ts {v!r} is not an ISO 8601 timestamp"]) from None
    if t.microsecond or t.nanosecond:
        raise BarValidationError([f"bar {i}: ts {v!r} has fractional seconds; bars open on whole seconds"])
    # whole seconds, exact in a float far beyond any year a bar can have
    return int(t.timestamp())


def _check_values(
    cols: Mapping[str, npt.NDArray[np.float64]], ts: npt.NDArray[np.int64], timeframe: Timeframe
) -> list[str]:
    errors: list[str] = []
    now = int(time.time())
    bad = np.flatnonzero((ts < MIN_TS) | (ts > now))
    errors += [
        f"bar {i}: ts {_iso(int(ts[i]))} is out of range: bars open from 1800 until now ({_iso(now)})" for i in bad[:5]
    ]
    o, h, lo, c, v = (cols[f] for f in FIELDS)
    for f in FIELDS:
        bad = np.flatnonzero(~np.isfinite(cols[f]))
        errors += [f"bar {i}: {f} is {_fmt(cols[f][i])}; must be a finite number" for i in bad[:5]]
    if errors:
        return errors
    for f in ("open", "high", "low", "close"):
        bad = np.flatnonzero(cols[f] <= 0)
        errors += [f"bar {i}: {f} {_fmt(cols[f][i])} must be > 0" for i in bad[:5]]
    bad = np.flatnonzero(h < np.maximum(o, c))
    errors += [f"bar {i}: high {_fmt(h[i])} < max(open, close) {_fmt(max(o[i], c[i]))}" for i in bad[:5]]
    bad = np.flatnonzero(lo > np.minimum(o, c))
    errors += [f"bar {i}: low {_fmt(lo[i])} > min(open, close) {_fmt(min(o[i], c[i]))}" for i in bad[:5]]
    bad = np.flatnonzero(v < 0)
    errors += [f"bar {i}: volume {_fmt(v[i])} must be >= 0" for i in bad[:5]]
    bad = np.flatnonzero(~timeframe.is_aligned(ts))
    errors += [
        f"bar {i}: ts {_iso(int(ts[i]))} is not aligned to {timeframe.value} (a bar opens at "
        f"{_iso(int(timeframe.floor(ts[i : i + 1])[0]))})"
        for i in bad[:5]
    ]
    return errors
