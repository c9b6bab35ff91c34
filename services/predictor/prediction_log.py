"""The prediction log: every served prediction, buffered in memory and written in COPY batches.

Each feature window is stored once per window hash (table `prediction_windows`); a prediction row references
it by `window_hash`, so a cached prediction costs one narrow row, not 340 floats.

Requests only append to a bounded deque (no I/O on the request path). A background task drains it every
`PREDICTION_LOG_FLUSH_SECONDS` or as soon as `PREDICTION_LOG_BATCH_ROWS` are waiting. While PostgreSQL is
unreachable the rows stay buffered; past `PREDICTION_LOG_BUFFER_ROWS` the oldest are dropped and counted
in `ml_prediction_log_dropped_total`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import struct
import uuid
from collections import OrderedDict, deque
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg
import numpy as np

from services.predictor import repository
from services.predictor.metrics import LOG_DROPPED, LOG_PRUNED, LOG_WRITTEN
from shared.background import cancel_and_wait

log = logging.getLogger("predictor.log")

Row = tuple[Any, ...]


class LogRecord(NamedTuple):
    """One served prediction as buffered: cheap to build on the request path (no conversions)."""

    prediction_id: uuid.UUID
    created: float  # Unix time, seconds
    symbol: str
    timeframe: str
    bar_ts: str  # ISO 8601 with "Z", as in the response
    model_version: str
    variant: str
    user_hash: str | None
    window_hash: str
    window_b64: str  # the float32 window, row-major
    window_shape: list[int]
    probabilities: list[float]  # CLASSES order (SELL, HOLD, BUY)
    signal: str
    confidence: float
    consensus_signal: str
    cached: bool
    request_id: str | None


def to_row(r: LogRecord) -> Row:
    """A buffered record as a row of `repository.LOG_COLUMNS`."""
    return (
        r.prediction_id,
        datetime.fromtimestamp(r.created, UTC),
        r.symbol,
        r.timeframe,
        datetime.fromisoformat(r.bar_ts.replace("Z", "+00:00")),
        r.model_version,
        r.variant,
        r.user_hash,
        r.window_hash,
        r.probabilities,
        r.signal,
        r.confidence,
        r.consensus_signal,
        r.cached,
        r.request_id,
    )


# Binary COPY of a batch (PostgreSQL's "PGCOPY" format: per row a field count, then each field as its length and
# big-endian bytes; -1 for NULL), columns in `repository.BINARY_LOG_COLUMNS` order: what differs per request
# first, then what a cache entry's every request shares, encoded once per entry. 2.4 us a row of this process's
# CPU against 5.3 us for `to_row` and asyncpg's `copy_records_to_table` (500-row batches, benchmarks/bench_stack.py,
# 2026-12-04): a cached prediction costs about 110 us, and each is logged.
_PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_PGCOPY_TRAILER = b"\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_US = 946_684_800_000_000
_MICROSECOND = timedelta(microseconds=1)
_HEAD = struct.Struct(">hi16siq")  # field count; id (uuid); created_at (timestamptz: us since 2000)
_INT4 = struct.Struct(">i")
_FLOAT4 = struct.Struct(">f")
_TIMESTAMPTZ = struct.Struct(">iq")
_FLOAT4_ARRAY = struct.Struct(">iiiii")  # ndim 1, no NULLs, element type float4 (oid 700), length, lower bound 1
_NULL = b"\xff\xff\xff\xff"
_CACHED = {True: b"\x00\x00\x00\x01\x01", False: b"\x00\x00\x00\x01\x00"}
_TAIL_ENTRIES = 4096


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    raw = value.encode()
    return _INT4.pack(len(raw)) + raw


def _float4(value: float) -> bytes:
    return b"\x00\x00\x00\x04" + _FLOAT4.pack(value)


def _shared_fields(r: LogRecord) -> bytes:
    """symbol, timeframe, bar_ts, model_version, window_hash, probabilities, signal, confidence,
    consensus_signal: the fields every request served from one cache entry has in common."""
    bar_us = (datetime.fromisoformat(r.bar_ts.replace("Z", "+00:00")) - _PG_EPOCH) // _MICROSECOND
    probabilities = _FLOAT4_ARRAY.pack(1, 0, 700, len(r.probabilities), 1) + b"".join(map(_float4, r.probabilities))
    return b"".join(
        (
            _text(r.symbol),
            _text(r.timeframe),
            _TIMESTAMPTZ.pack(8, bar_us),
            _text(r.model_version),
            _text(r.window_hash),
            _INT4.pack(len(probabilities)) + probabilities,
            _text(r.signal),
            _float4(r.confidence),
            _text(r.consensus_signal),
        )
    )


def _epoch_us(t: float) -> int:
    """Microseconds since 1970 rounded as `datetime.fromtimestamp(t)` rounds them (`to_row`), so a record reads
    the same before and after it is written."""
    frac, whole = math.modf(t)
    return int(whole) * 1_000_000 + round(frac * 1e6)


class RowEncoder:
    """Encodes batches of records as binary COPY data; remembers the shared fields of recent cache entries."""

    def __init__(self) -> None:
        self._tails: dict[tuple[Any, ...], bytes] = {}

    def encode(self, records: list[LogRecord]) -> bytes:
        out = [_PGCOPY_HEADER]
        tails = self._tails
        for r in records:
            key = (
                r.symbol,
                r.timeframe,
                r.bar_ts,
                r.model_version,
                r.window_hash,
                *r.probabilities,
                r.signal,
                r.confidence,
                r.consensus_signal,
            )
            tail = tails.get(key)
            if tail is None:
                if len(tails) >= _TAIL_ENTRIES:
                    tails.clear()
                tail = tails[key] = _shared_fields(r)
            out += (
                _HEAD.pack(15, 16, r.prediction_id.bytes, 8, _epoch_us(r.created) - _PG_EPOCH_US),
                _text(r.variant),
                _text(r.user_hash),
                _CACHED[r.cached],
                _text(r.request_id),
                tail,
            )
        out.append(_PGCOPY_TRAILER)
        return b"".join(out)


def window_row(r: LogRecord) -> Row:
    """The record's feature window as a row of `repository.WINDOW_COLUMNS`."""
    features = np.frombuffer(base64.b64decode(r.window_b64), dtype=np.float32).tolist()
    return (r.window_hash, datetime.fromtimestamp(r.created, UTC), features, r.window_shape)


def to_record_row(r: LogRecord) -> Row:
    """A buffered record as a row of `repository.RECORD_COLUMNS` (GET /v1/predictions/{id})."""
    window = window_row(r)
    return (*to_row(r), window[2], window[3])


class PredictionLog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        flush_seconds: float,
        batch_rows: int,
        buffer_rows: int,
        retention_days: int,
        prune_interval_seconds: float,
        remember_hashes: int = 50_000,
    ) -> None:
        self.pool = pool
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self.buffer_rows = buffer_rows
        self.retention_days = retention_days
        self.prune_interval_seconds = prune_interval_seconds
        self.buffer: deque[LogRecord] = deque()
        # The batch a flush has taken out of the buffer and is writing: still findable until it is committed.
        self._writing: list[LogRecord] = []
        self.dropped = 0
        self.windows_written = 0  # windows sent to PostgreSQL (after dedupe); tests read it
        self.last_error: str | None = None
        # Windows already written (hash → None, oldest first): a window served again (a cached prediction, a
        # repeated input) is not sent again. ON CONFLICT DO NOTHING covers what this forgot or another worker
        # wrote.
        self._written: OrderedDict[str, None] = OrderedDict()
        self.remember_hashes = remember_hashes
        self._full = asyncio.Event()
        # One flush at a time: a flush asked for by a request (the explanation route) returns only once
        # whatever the writer had taken out of the buffer is committed too.
        self._flush_lock = asyncio.Lock()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._encoder = RowEncoder()

    def append(self, record: LogRecord) -> None:
        if len(self.buffer) >= self.buffer_rows:
            self.buffer.popleft()
            self.dropped += 1
            LOG_DROPPED.inc()
        self.buffer.append(record)
        if len(self.buffer) >= self.batch_rows:
            self._full.set()

    def find(self, prediction_id: uuid.UUID) -> LogRecord | None:
        """A record not yet written (so GET /v1/predictions/{id} finds it right after the POST), buffered or in
        the batch being written: a caller that must read the row back (POST /v1/outcomes) then flushes, which
        waits for that batch's commit, instead of reading before it and answering 404."""
        for record in reversed(self.buffer):
            if record.prediction_id == prediction_id:
                return record
        for record in self._writing:
            if record.prediction_id == prediction_id:
                return record
        return None

    def pending(self, prediction_id: str) -> Row | None:
        """A record not yet written, as a row of `repository.RECORD_COLUMNS`."""
        record = self.find(uuid.UUID(prediction_id))
        return to_record_row(record) if record is not None else None

    async def flush(self) -> int:
        """Write everything buffered, batch by batch. Returns rows written; raises if the database fails."""
        async with self._flush_lock:
            return await self._flush()

    async def _flush(self) -> int:
        written = 0
        while self.buffer:
            # Take the batch out first: appends (and drops) may happen while COPY awaits.
            batch = self._writing = [self.buffer.popleft() for _ in range(min(self.batch_rows, len(self.buffer)))]
            windows: dict[str, Row] = {}
            for r in batch:
                h = r.window_hash
                if h not in windows and h not in self._written:
                    windows[h] = window_row(r)
            try:
                await repository.copy_predictions(self.pool, self._encoder.encode(batch), list(windows.values()))
            except BaseException:
                self._requeue(batch)
                raise
            finally:
                self._writing = []
            for h in windows:
                self._written[h] = None
            while len(self._written) > self.remember_hashes:
                self._written.popitem(last=False)
            self.windows_written += len(windows)
            written += len(batch)
            LOG_WRITTEN.inc(len(batch))
        return written

    def _requeue(self, batch: list[LogRecord]) -> None:
        """Put a failed batch back in front; what no longer fits is the oldest and is dropped."""
        room = self.buffer_rows - len(self.buffer)
        keep = batch[-room:] if room > 0 else []
        lost = len(batch) - len(keep)
        if lost:
            self.dropped += lost
            LOG_DROPPED.inc(lost)
        self.buffer.extendleft(reversed(keep))

    async def _writer(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.flush_seconds)
            self._full.clear()
            try:
                await self.flush()
                self.last_error = None
            except Exception as exc:  # keep serving; rows stay buffered (bounded)
                if self.last_error is None:
                    log.warning(
                        "prediction log write failed; buffering",
                        extra={"error": str(exc), "buffered": len(self.buffer)},
                    )
                self.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(min(1.0, self.flush_seconds * 5))

    async def prune(self) -> int:
        if self.retention_days <= 0:
            return 0
        n, windows = await repository.prune_predictions(self.pool, self.retention_days)
        if windows:
            # A pruned window may come back; it must then be written again.
            self._written.clear()
        if n or windows:
            LOG_PRUNED.inc(n)
            log.info(
                "pruned prediction log",
                extra={"deleted": n, "windows_deleted": windows, "retention_days": self.retention_days},
            )
        return n

    async def _pruner(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception as exc:  # try again next interval
                log.warning("prediction log prune failed", extra={"error": str(exc)})
            await asyncio.sleep(self.prune_interval_seconds)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer()), asyncio.create_task(self._pruner())]

    async def stop(self) -> None:
        # The writer is not cancelled mid-COPY (a batch whose commit was under way would be requeued and
        # written twice): it finishes its round and leaves; the last flush below takes the rest.
        self._stopping = True
        self._full.set()
        writer = self._tasks[0] if self._tasks else None
        with contextlib.suppress(Exception):
            if writer is not None:
                await asyncio.wait_for(asyncio.shield(writer), 5.0)
        await cancel_and_wait(self._tasks)
        try:
            await asyncio.wait_for(self.flush(), 5.0)
        except Exception as exc:
            # Counted as dropped too: with PROMETHEUS_MULTIPROC_DIR the sample outlives this process, so the
            # other workers' /metrics still report the loss.
            lost = len(self.buffer)
            self.dropped += lost
            LOG_DROPPED.inc(lost)
            log.warning("prediction log: %d rows not written at shutdown", lost, extra={"error": str(exc)})
