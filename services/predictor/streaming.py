"""Signals pushed at bar close: computed once per completed bar across replicas, fanned out through Redis.

Three parts, all per process (docs/STREAMING.md):

- `BarCloser` hears the ingest's NOTIFY (`market_series`, the channel `series.SeriesStamps` listens on) and
  sweeps every served series each `STREAM_SWEEP_SECONDS` (so a lost notification, or a Redis outage, delays
  a signal instead of losing it). When the newest completed bar of a served (symbol, timeframe) is newer
  than the last one signalled, the replica that wins a Redis `SET NX` lease (`signals:lease:{symbol}:{tf}:{bar}`)
  computes the signal through `Predictor.predict` (logged like any prediction, request id
  `stream:{symbol}:{tf}:{bar}`) and appends it to the Redis stream `signals:events` (`signals` is
  `STREAM_KEY_PREFIX`). A timeframe with a
  model but no stored bars of its own is resampled from the stored lower timeframe that was ingested
  (completed bars only, `shared.timeframes.resample`).
- `SignalHub` reads `signals:events` once per process (`XREAD BLOCK`) and hands every event to the local
  subscribers of its series, each through a bounded queue: a subscriber whose queue is full is cut (it
  gets an `error` event when it can still take one), never waited for.
- Every shared event is first written to PostgreSQL (`signal_events`, migration 0007: the prediction id, its
  series and bar, and the exact bytes sent as `data`), then appended to Redis, under one transaction-level
  advisory lock, so the rows' `created_at` order is the order of the Redis stream. A resume by
  `Last-Event-ID` reads its backlog from that table (no further back than `STREAM_REPLAY_HOURS`, at most
  `STREAM_REPLAY_EVENTS` events): Redis is the live fan-out and a cache, and may restart empty. The table's
  unique (symbol, timeframe, bar_ts, variant) makes the once-per-bar rule durable: a lease lost with a Redis
  restart finds the bar's row and republishes it instead of signalling the bar a second time.

A Redis stream rather than pub/sub: a process that reconnects after a Redis error reads on from the last
entry it saw, so its subscribers miss nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from services.predictor.metrics import STREAM_CUT, STREAM_SIGNALS, STREAM_SUBSCRIBERS
from services.predictor.service import PredictionRequest, Predictor
from services.predictor.settings import PredictorSettings
from shared.background import cancel_and_wait
from shared.bars import bars_to_rows
from shared.db import PgListener
from shared.errors import NotFoundError, ValidationFailed
from shared.market_repository import SERIES_CHANNEL, latest_bars, list_series
from shared.timeframes import Timeframe, can_resample, resample
from shared.warmup import WARMUP_BARS

log = logging.getLogger("predictor.streaming")

REQUEST_PREFIX = "stream:"
# pg_advisory_xact_lock key of the publish (INSERT into signal_events, then XADD, then COMMIT): publishes of all
# replicas take turns, so `created_at` order is the Redis stream's order and a resume after the last event
# received misses nothing that was published before it. ("signals" as an int64.)
_PUBLISH_LOCK = 0x7369676E616C73
# How often the stream loop deletes signal_events rows older than STREAM_REPLAY_HOURS.
_PRUNE_EVERY_S = 300.0
# The columns every query of events selects (SignalEvent.from_row reads them).
_SELECT_EVENT = (
    "SELECT prediction_id::text AS id, symbol, timeframe, variant, body, extract(epoch FROM bar_ts)::bigint AS bar"
)
# Sets the last signalled bar only forward: two winners of consecutive bars may finish out of order.
_ADVANCE = (
    "local cur = tonumber(redis.call('GET', KEYS[1]) or '-1') "
    "if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) return 1 end return 0"
)

SeriesKey = tuple[str, str]


def series_name(symbol: str, timeframe: str) -> str:
    return f"{symbol}:{timeframe}"


def uuid7_ms(value: str) -> int:
    """The Unix time in ms in the first 48 bits of a uuid7 prediction id."""
    return uuid.UUID(value).int >> 80


@dataclass(frozen=True, slots=True)
class SignalEvent:
    """One published signal: the prediction id, its series, and the prediction JSON as sent."""

    id: str
    series: str
    variant: str
    data: bytes
    bar_ts: int  # open time of the signalled bar, epoch seconds

    def fields(self) -> dict[FieldT, EncodableT]:
        return {"id": self.id, "series": self.series, "variant": self.variant, "data": self.data, "bar": self.bar_ts}

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> SignalEvent:
        return cls(
            raw[b"id"].decode(), raw[b"series"].decode(), raw[b"variant"].decode(), raw[b"data"], int(raw[b"bar"])
        )

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> SignalEvent:
        """From a `signal_events` row selected by `_SELECT_EVENT`."""
        return cls(
            row["id"], series_name(row["symbol"], row["timeframe"]), row["variant"], bytes(row["body"]), int(row["bar"])
        )


@dataclass(frozen=True, slots=True)
class Notice:
    """A status event for subscribers (Redis lost or back; resume window exceeded)."""

    event: Literal["error", "status"]
    body: dict[str, Any]


class Subscriber:
    """One SSE connection's bounded queue. `offer` never blocks: a full queue cuts the subscriber.

    A deque and one future to wake the reader, not an asyncio.Queue raced against an Event: at 500
    subscribers per process that race (two futures and asyncio.wait per event and connection) was the
    largest share of the fan-out time (benchmarks/bench_streaming.py)."""

    __slots__ = ("_items", "_waiter", "cut", "cut_reason", "maxsize", "sending_since", "series")

    def __init__(self, series: frozenset[str], maxsize: int) -> None:
        self.series = series
        self.maxsize = maxsize
        self.cut_reason: str | None = None
        self.cut = asyncio.Event()  # set once cut (the response watches it to close a reader that is stuck)
        self._items: deque[SignalEvent | Notice] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.sending_since: float | None = None  # time.monotonic() when a write to the client began, until done

    def offer(self, item: SignalEvent | Notice) -> None:
        if self.cut_reason is not None:
            return
        if len(self._items) >= self.maxsize:
            self.close(f"slow subscriber: {self.maxsize} events queued unread; reconnect with Last-Event-ID to resume")
            STREAM_CUT.inc()
            return
        self._items.append(item)
        self._wake()

    def close(self, reason: str) -> None:
        self.cut_reason = reason
        self._items.clear()
        self.cut.set()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> SignalEvent | Notice | None:
        """The next item, or None once cut (then `cut_reason` says why)."""
        while not self._items and self.cut_reason is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.cut_reason is not None:
            return None
        return self._items.popleft()


Callback = Callable[[SignalEvent], Awaitable[None]]


class SignalHub:
    """Fan-out of `signals:events` to this process's subscribers; publish and replay through `signal_events`."""

    def __init__(self, settings: PredictorSettings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.stream_key = f"{settings.stream_key_prefix}:events"
        self.block_ms = 5_000
        # Its own client: XREAD BLOCK holds a connection, and the socket timeout must outlast the block.
        self.redis = (
            aioredis.Redis.from_url(
                settings.redis_url,
                socket_timeout=self.block_ms / 1000 + 2.0,
                socket_connect_timeout=max(settings.redis_connect_timeout_seconds, 1.0),
                retry=Retry(NoBackoff(), retries=0),
                client_name="aicash-predictor-stream",
                decode_responses=False,
            )
            if settings.redis_url
            else None
        )
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._everyone: set[Subscriber] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.redis_ok = self.redis is not None
        self.redis_error: str | None = None if self.redis is not None else "REDIS_URL is not set"
        self.last_id: bytes | None = None  # the last stream entry read; None until the first read
        self.delivered = 0  # events handed to subscribers' queues (tests and the benchmark read it)

    # --- subscribers ---

    def subscribe(self, series: Iterable[str]) -> Subscriber:
        sub = Subscriber(frozenset(series), self.settings.stream_queue_events)
        for s in sub.series:
            self._subscribers.setdefault(s, set()).add(sub)
        self._everyone.add(sub)
        STREAM_SUBSCRIBERS.inc()
        if not self.redis_ok:
            sub.offer(self._down_notice())
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub not in self._everyone:
            return
        self._everyone.discard(sub)
        for s in sub.series:
            subs = self._subscribers.get(s)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[s]
        STREAM_SUBSCRIBERS.dec()

    @property
    def subscribers(self) -> int:
        return len(self._everyone)

    def dispatch(self, event: SignalEvent) -> None:
        for sub in list(self._subscribers.get(event.series, ())):
            sub.offer(event)
            self.delivered += 1

    def _broadcast(self, notice: Notice) -> None:
        for sub in list(self._everyone):
            sub.offer(notice)

    def _down_notice(self) -> Notice:
        return Notice(
            "error",
            {
                "reason": "redis_unavailable",
                "detail": f"signals cannot be published or received while Redis is unreachable ({self.redis_error}); "
                "this stream stays open and resumes when Redis is back",
            },
        )

    # --- publish and replay ---

    async def publish(self, event: SignalEvent) -> SignalEvent:
        """Store the event in `signal_events`, then append it to the Redis stream, in one transaction under the
        publish lock. When the bar already has a row for the variant (computed by a replica whose Redis lease
        was lost), that row is published instead and returned. A Redis error rolls the row back (the bar is
        tried again); a crash between XADD and COMMIT leaves a live event without its row (not replayable)."""
        if self.redis is None:
            raise RuntimeError("REDIS_URL is not set: signals cannot be published")
        symbol, _, timeframe = event.series.partition(":")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PUBLISH_LOCK)
            inserted = await conn.fetchval(
                "INSERT INTO signal_events (prediction_id, symbol, timeframe, bar_ts, variant, body) "
                "VALUES ($1, $2, $3, to_timestamp($4), $5, $6) "
                "ON CONFLICT (symbol, timeframe, bar_ts, variant) DO NOTHING RETURNING true",
                uuid.UUID(event.id),
                symbol,
                timeframe,
                event.bar_ts,
                event.variant,
                event.data,
            )
            if not inserted:
                row = await conn.fetchrow(
                    _SELECT_EVENT + " FROM signal_events "
                    "WHERE symbol = $1 AND timeframe = $2 AND bar_ts = to_timestamp($3) AND variant = $4",
                    symbol,
                    timeframe,
                    event.bar_ts,
                    event.variant,
                )
                if row is not None:
                    event = SignalEvent.from_row(row)
            await self._xadd(event)
        return event

    async def republish(self, event: SignalEvent) -> None:
        """Append an event that `signal_events` holds already to the Redis stream (its row keeps its place)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PUBLISH_LOCK)
            await self._xadd(event)

    async def _xadd(self, event: SignalEvent) -> None:
        assert self.redis is not None
        # The Redis stream is the live fan-out only: a short tail is enough for readers that reconnect.
        await self.redis.xadd(
            self.stream_key, event.fields(), maxlen=self.settings.stream_replay_events, approximate=True
        )

    async def stored(self, symbol: str, timeframe: str, bar: int) -> SignalEvent | None:
        """The shared event already stored for this bar (any variant, the first stored), if any."""
        row = await self.pool.fetchrow(
            _SELECT_EVENT + " FROM signal_events WHERE symbol = $1 AND timeframe = $2 "
            "AND bar_ts = to_timestamp($3) ORDER BY created_at LIMIT 1",
            symbol,
            timeframe,
            bar,
        )
        return None if row is None else SignalEvent.from_row(row)

    async def backlog(self, series: frozenset[str], last_event_id: str) -> tuple[list[SignalEvent], bool]:
        """The events of `series` published after `last_event_id`, oldest first, from `signal_events`, and
        whether some may be missing: the id is older than STREAM_REPLAY_HOURS, or more than STREAM_REPLAY_EVENTS
        events followed it (then the newest of them are returned).

        "After" is in publish order, `(created_at, prediction_id)`, counted from the row of `last_event_id`;
        an id that has no row (a per-user event, or one pruned) counts from the time in its uuid7."""
        window_s = self.settings.stream_replay_hours * 3600.0
        limit = self.settings.stream_replay_events
        pairs = [name.partition(":") for name in sorted(series)]
        last = uuid.UUID(last_event_id)
        async with self.pool.acquire() as conn:
            anchor: datetime | None = await conn.fetchval(
                "SELECT created_at FROM signal_events WHERE prediction_id = $1", last
            )
            now_s = time.time()
            floor = datetime.fromtimestamp(now_s - window_s, UTC)
            # Not a time-ordered id, or one from the future: all the window holds follows, flagged.
            unknown = anchor is None and (last.version != 7 or uuid7_ms(last_event_id) > (now_s + 300) * 1000)
            if unknown:
                anchor = floor
            elif anchor is None:
                anchor = datetime.fromtimestamp(uuid7_ms(last_event_id) / 1000, UTC)
            rows = await conn.fetch(
                _SELECT_EVENT + ", created_at FROM signal_events "
                "JOIN unnest($1::text[], $2::text[]) AS s (symbol, timeframe) USING (symbol, timeframe) "
                "WHERE (created_at, prediction_id) > ($3, $4) AND created_at >= $5 "
                "ORDER BY created_at DESC, prediction_id DESC LIMIT $6",
                [p[0] for p in pairs],
                [p[2] for p in pairs],
                anchor,
                last,
                floor,
                limit + 1,
            )
        overflow = len(rows) > limit
        events = [SignalEvent.from_row(r) for r in reversed(rows[:limit])]
        return events, unknown or anchor < floor or overflow

    async def prune(self) -> int:
        """Delete the `signal_events` rows older than the replay window; the number deleted."""
        status = await self.pool.execute(
            "DELETE FROM signal_events WHERE created_at < now() - make_interval(secs => $1)",
            self.settings.stream_replay_hours * 3600.0,
        )
        return int(status.split()[-1])

    # --- the reader ---

    async def _tail_id(self) -> bytes:
        assert self.redis is not None
        last = _entries(await self.redis.xrevrange(self.stream_key, max="+", min="-", count=1))
        return last[0][0] if last else b"0-0"

    async def _read(self) -> None:
        assert self.redis is not None
        if self.last_id is None:
            self.last_id = await self._tail_id()
        got = cast(
            "list[tuple[bytes, Any]] | None",
            await self.redis.xread({self.stream_key: self.last_id}, block=self.block_ms, count=1000),
        )
        for _stream, raw in got or ():
            entries = _entries(raw)
            for entry_id, fields in entries:
                self.last_id = entry_id
                try:
                    event = SignalEvent.from_fields(fields)
                except (KeyError, ValueError) as exc:
                    log.warning("unreadable stream entry %r skipped", entry_id, extra={"error": str(exc)})
                    continue
                self.dispatch(event)
                if len(entries) > 1:
                    # Let the connections drain their queues between the entries of a burst (a reconnect
                    # reads all it missed at once): only a subscriber that does not read is cut by it.
                    await asyncio.sleep(0)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                if not self.redis_ok:
                    # A Redis that restarted empty has lower ids than the last one read: read from its start.
                    tail = await self._tail_id()
                    if self.last_id is not None and _id_tuple(tail) < _id_tuple(self.last_id):
                        self.last_id = b"0-0"
                    self.redis_ok, self.redis_error = True, None
                    log.info("signal stream: Redis is back")
                    self._broadcast(Notice("status", {"redis": "ok", "detail": "Redis is reachable again"}))
                    delay = 0.2
                await self._read()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.redis_ok:
                    self.redis_ok, self.redis_error = False, f"{type(exc).__name__}: {exc}"
                    log.warning("signal stream: Redis unavailable", extra={"error": self.redis_error})
                    self._broadcast(self._down_notice())
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _watchdog(self) -> None:
        """Cuts subscribers whose write has been blocked past STREAM_SEND_TIMEOUT_SECONDS (they read nothing)."""
        limit = self.settings.stream_send_timeout_seconds
        while True:
            await asyncio.sleep(min(1.0, limit / 2))
            now = time.monotonic()
            for sub in list(self._everyone):
                since = sub.sending_since
                if since is not None and now - since > limit and sub.cut_reason is None:
                    sub.close(f"slow subscriber: nothing read for {limit:g} s; reconnect with Last-Event-ID to resume")
                    STREAM_CUT.inc()

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._watchdog()))
        if self.redis is not None:
            self._tasks.append(asyncio.create_task(self._run()))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        for sub in list(self._everyone):
            sub.close("the server is shutting down; reconnect with Last-Event-ID to resume")
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


def _epoch_s(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def _entries(raw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries as redis-py returns them without decoding (its annotations cover every mode)."""
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", raw or [])


def _id_tuple(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class BarCloser:
    """Detects completed bars of served series and computes each one's signal once across replicas."""

    def __init__(
        self,
        settings: PredictorSettings,
        pool: asyncpg.Pool,
        predictor: Predictor,
        hub: SignalHub,
        database_url: str | None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.predictor = predictor
        self.hub = hub
        self.redis = hub.redis
        self._advance = self.redis.register_script(_ADVANCE) if self.redis is not None else None
        self._pending: set[SeriesKey] = set()  # (symbol, ingested timeframe) from notifications
        self._wake = asyncio.Event()
        self._seen: dict[SeriesKey, int] = {}  # (symbol, tf) -> bar known to be signalled (saves Redis reads)
        self._callbacks: list[Callback] = []
        self.bases: dict[SeriesKey, Timeframe] = {}  # (symbol, tf) -> the stored timeframe its bars come from
        self._listener = (
            PgListener(
                database_url,
                SERIES_CHANNEL,
                "aicash-predictor-stream",
                on_notify=self._notified,
                on_lost=self._wake.set,
            )
            if database_url is not None
            else None
        )
        self._task: asyncio.Task[None] | None = None
        self.computed = 0  # signals this process computed (tests read it)

    def subscribe_internal(self, callback: Callback) -> Callable[[], None]:
        """Call `callback(event)` for every signal, exactly once across replicas: in the process that computed
        it, right after it was published (the webhook dispatcher uses this). Returns the unsubscribe."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def _notified(self, payload: str) -> None:
        try:
            body = orjson.loads(payload)
            self._pending.add((str(body["symbol"]), str(body["timeframe"])))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._pending.update({(s, t) for s, t in self.predictor.models.models})
        self._wake.set()

    # --- which bar is complete ---

    async def _plan(self, only: set[SeriesKey] | None) -> list[tuple[str, Timeframe, Timeframe]]:
        """(symbol, served timeframe, base timeframe its bars come from) to check; `only`: (symbol, ingested
        timeframe) pairs to limit it to, None for every served series."""
        served = list(self.predictor.models.models)
        symbols = {s for s, _ in served} if only is None else {s for s, _ in only}
        stored: dict[str, set[Timeframe]] = {}
        for symbol in symbols:
            stored[symbol] = {info.timeframe for info in await list_series(self.pool, symbol)}
        plan: list[tuple[str, Timeframe, Timeframe]] = []
        for symbol, tf_name in served:
            if symbol not in stored:
                continue
            tf = Timeframe(tf_name)
            have = stored[symbol]
            if tf in have:
                base: Timeframe | None = tf
            else:
                # Resampled: from the finest stored timeframe that builds it (as a client would ask for it).
                lower = sorted((b for b in have if b != tf and can_resample(b, tf)), key=lambda b: b.seconds)
                base = lower[0] if lower else None
            if base is None:
                continue
            if only is not None and (symbol, base.value) not in only:
                continue
            plan.append((symbol, tf, base))
            self.bases[(symbol, tf.value)] = base
        return plan

    async def _completed_bar(self, symbol: str, tf: Timeframe, base: Timeframe) -> int | None:
        newest = await latest_bars(self.pool, symbol, base, 1)  # the newest closed base bar
        if len(newest) == 0:
            return None
        last = int(newest.ts[-1])
        if tf is base:
            return last
        # shared.timeframes.resample's rule: a bar is complete once the base data reach its close.
        key = int(tf.floor(newest.ts)[-1])
        return key if last + base.seconds >= key + tf.seconds else key - tf.seconds

    # --- once per bar ---

    async def check(self, symbol: str, tf: Timeframe, base: Timeframe) -> SignalEvent | None:
        """Compute and publish the signal of the newest completed bar if nobody has; the event if this
        process published it (computed here, or stored already and republished to a Redis that lacked it)."""
        if self.redis is None or self._advance is None:
            return None
        bar = await self._completed_bar(symbol, tf, base)
        known = self._seen.get((symbol, tf.value))
        if bar is None or known == bar:
            return None
        name = series_name(symbol, tf.value)
        last_key = f"{self.settings.stream_key_prefix}:last:{name}"
        last = await self.redis.get(last_key)
        if last is None:
            if known is None:
                # First sight of this series: bars before now are history, not news. Signal from the next one.
                await self.redis.set(last_key, bar, nx=True)
                self._seen[(symbol, tf.value)] = bar
                return None
            # A Redis that came back empty: what this process saw signalled still stands.
            await self.redis.set(last_key, known, nx=True)
            last = str(known).encode()
        if bar <= int(last):
            self._seen[(symbol, tf.value)] = bar
            return None
        lease = f"{self.settings.stream_key_prefix}:lease:{name}:{bar}"
        if not await self.redis.set(lease, "1", nx=True, ex=self.settings.stream_lease_seconds):
            return None  # another replica computes it; the next round finds it signalled (or the lease expired)
        try:
            stored = await self.hub.stored(symbol, tf.value, bar)
            if stored is not None:
                # Signalled already, but this Redis does not know it (it restarted empty, or the publisher died
                # between its commit and XADD): publish the stored event again, never a second signal of the bar.
                await self.hub.republish(stored)
            else:
                body = await self._compute(symbol, tf, base, bar)
        except (ValidationFailed, NotFoundError) as exc:
            # Too few bars, no model any more: retrying will not help until the next bar.
            log.info("no stream signal for %s bar %d", name, bar, extra={"error": exc.message})
            await self._advance(keys=[last_key], args=[bar])
            self._seen[(symbol, tf.value)] = bar
            return None
        except Exception:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(lease)  # a later round (here or elsewhere) tries again
            raise
        if stored is not None:
            await self._advance(keys=[last_key], args=[bar])
            self._seen[(symbol, tf.value)] = bar
            await self._handed_over(stored)
            return stored
        head = orjson.loads(body)
        if _epoch_s(str(head["bar_ts"])) != bar:
            await self.redis.delete(lease)  # the window did not end at the bar (yet): try again next round
            raise RuntimeError(f"{name}: the prediction's window ends at {head['bar_ts']}, not at bar {bar}")
        event = SignalEvent(str(head["prediction_id"]), name, str(head.get("variant", "production")), body, bar)
        try:
            published = await self.hub.publish(event)
        except Exception:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(lease)
            raise
        await self._advance(keys=[last_key], args=[bar])
        self._seen[(symbol, tf.value)] = bar
        if published.id == event.id:
            self.computed += 1
            STREAM_SIGNALS.inc()
        await self._handed_over(published)
        return published

    async def _handed_over(self, event: SignalEvent) -> None:
        # A republished event may reach the callbacks twice across replicas: the webhook dispatcher's claim
        # (webhook_dispatches, keyed by the prediction id) enqueues its deliveries once.
        for callback in list(self._callbacks):
            try:
                await callback(event)
            except Exception:
                log.exception("signal callback failed for %s", event.id)

    async def _compute(
        self, symbol: str, tf: Timeframe, base: Timeframe, bar: int, user_id: str | None = None
    ) -> bytes:
        request_id = f"{REQUEST_PREFIX}{symbol}:{tf.value}:{bar}" + (":user" if user_id is not None else "")
        if tf is base:
            # This listener and SeriesStamps' hear the NOTIFY on two connections, in no set order: drop the
            # series' stamp so the prediction reads the committed bars, not a cached window of the bar before.
            # Once per bar, for the shared event: a per-user computation of the same bar reads what it read.
            if user_id is None:
                self.predictor.series.invalidate((symbol, tf.value))
            req = PredictionRequest(symbol, tf, [tf], None, user_id, split_by_request_id=False)
            return await self.predictor.predict(req, request_id)
        model, _variant = self.predictor.select_model(symbol, tf.value, user_id, None)
        ratio = tf.seconds // base.seconds
        need = WARMUP_BARS + model.sequence_length + 1
        bars = await latest_bars(self.pool, symbol, base, (need + 1) * ratio)
        higher = resample(bars, base, tf).until(bar + 1)
        req = PredictionRequest(symbol, tf, [tf], bars_to_rows(higher), user_id, split_by_request_id=False)
        return await self.predictor.predict(req, request_id)

    async def for_user(self, event: SignalEvent, user_id: str) -> SignalEvent:
        """The event as the subscriber's user would get it: the shared one when the rollout routes the user to
        the event's variant, else the same bar's prediction for that user (computed on the normal path, so
        cached per variant and logged with the user's hash; request id `stream:{series}:{bar}:user`)."""
        symbol, _, tf_name = event.series.partition(":")
        try:
            _model, variant = self.predictor.select_model(symbol, tf_name, user_id, None)
        except NotFoundError:
            return event
        if variant == event.variant:
            return event
        newest = self._seen.get((symbol, tf_name))
        if newest is not None and event.bar_ts < newest:
            # An older bar (a replayed backlog): the stored bars have moved on, so computing now would log a
            # prediction of the newest bar and throw it away. The shared event says which variant served it.
            return event
        tf = Timeframe(tf_name)
        base = self.bases.get((symbol, tf_name), tf)
        body = await self._compute(symbol, tf, base, event.bar_ts, user_id)
        head = orjson.loads(body)
        if _epoch_s(str(head["bar_ts"])) != event.bar_ts:
            return event  # the stored bars moved on since: the shared event is the one of this bar
        return SignalEvent(str(head["prediction_id"]), event.series, str(head["variant"]), body, event.bar_ts)

    # --- the loop ---

    async def _round(self, only: set[SeriesKey] | None) -> None:
        for symbol, tf, base in await self._plan(only):
            try:
                await self.check(symbol, tf, base)
            except (RedisError, OSError) as exc:
                log.warning("stream signal for %s:%s deferred", symbol, tf.value, extra={"error": str(exc)})
                return  # Redis (or the database) is down: the next sweep tries again
            except Exception as exc:
                log.warning("stream signal for %s:%s failed", symbol, tf.value, extra={"error": str(exc)})

    async def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.connected:
            return
        try:
            await self._listener.connect()
        except Exception as exc:  # the sweep covers meanwhile
            log.warning("stream: cannot LISTEN on %s", SERIES_CHANNEL, extra={"error": str(exc)})

    async def _prune(self) -> None:
        try:
            deleted = await self.hub.prune()
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("stream: signal_events prune failed", extra={"error": str(exc)})
            return
        if deleted:
            log.info("stream: %d signal events past the replay window deleted", deleted)

    async def _run(self) -> None:
        next_sweep = time.monotonic()
        next_prune = time.monotonic()
        while True:
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + _PRUNE_EVERY_S
                await self._prune()
            await self._ensure_listener()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_sweep - time.monotonic()))
            self._wake.clear()
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.stream_sweep_seconds
                    self._pending.clear()
                    await self._round(None)
                elif self._pending:
                    pending, self._pending = self._pending, set()
                    await self._round(pending)
            except Exception as exc:  # the database may be down; the next sweep tries again
                log.warning("stream bar check failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)

    async def start(self) -> None:
        await self._ensure_listener()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        if self._listener is not None:
            await self._listener.close()


class SignalStreams:
    """What the lifespan creates: the hub and the bar closer of one process."""

    def __init__(
        self, settings: PredictorSettings, pool: asyncpg.Pool, predictor: Predictor, database_url: str | None
    ) -> None:
        self.hub = SignalHub(settings, pool)
        self.closer = BarCloser(settings, pool, predictor, self.hub, database_url)

    def subscribe_internal(self, callback: Callback) -> Callable[[], None]:
        return self.closer.subscribe_internal(callback)

    async def start(self) -> None:
        await self.hub.start()
        await self.closer.start()

    async def stop(self) -> None:
        await self.closer.stop()
        await self.hub.stop()
