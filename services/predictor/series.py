"""Per-series input stamps held in memory, kept current by the ingest's NOTIFY (plus a short poll).

A prediction from stored bars is identified by its series' stamp (newest bar time, last change). Reading it
from PostgreSQL on every request cost a round trip per cached prediction; instead the stamp of a series is
read once, then dropped when the indicators service announces (`pg_notify('market_series', ...)`, sent when
an ingest that changed bars commits) that its bars changed, so the next request reads the new one. A poll
re-reads every known stamp each `SERIES_POLL_SECONDS`, so a notification lost with a dropped connection
costs at most that long; while the listening connection is down, stamps are not trusted at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
import orjson

from shared.background import cancel_and_wait
from shared.db import PgListener
from shared.market_repository import SERIES_CHANNEL, SeriesStamp, series_stamp, series_stamps

log = logging.getLogger("predictor.series")

SeriesKey = tuple[str, str]


class SeriesStamps:
    def __init__(self, pool: asyncpg.Pool, database_url: str | None, poll_seconds: float) -> None:
        self.pool = pool
        self.database_url = database_url
        self.poll_seconds = poll_seconds
        self._stamps: dict[SeriesKey, SeriesStamp] = {}
        # Bumped by every invalidation: a read that started before one must not store its (older) result.
        self._epoch = 0
        self._listener = (
            PgListener(
                database_url,
                SERIES_CHANNEL,
                "aicash-predictor-series",
                on_notify=self._notified,
                on_lost=lambda: self._lost.set(),
            )
            if database_url is not None
            else None
        )
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.notifications = 0  # processed; tests wait on it

    @property
    def listening(self) -> bool:
        return self._listener is not None and self._listener.connected

    async def get(self, symbol: str, timeframe: str) -> SeriesStamp | None:
        key = (symbol, timeframe)
        stamp = self._stamps.get(key)
        if stamp is not None and self.listening:
            return stamp
        for _attempt in range(3):
            epoch = self._epoch
            stamp = await series_stamp(self.pool, symbol, timeframe)
            if epoch == self._epoch:
                break
            # A notification came while reading: the row read may predate it. Read again.
        # Without a listener nothing would tell us of a change before the next poll: read every time then.
        if stamp is not None and epoch == self._epoch and self.listening:
            self._stamps[key] = stamp
        return stamp

    @property
    def epoch(self) -> int:
        """Changes with every invalidation (any series)."""
        return self._epoch

    def invalidate(self, key: SeriesKey | None = None) -> None:
        self._epoch += 1
        if key is None:
            self._stamps.clear()
        else:
            self._stamps.pop(key, None)

    def _notified(self, payload: str) -> None:
        try:
            body = orjson.loads(payload)
            key: SeriesKey | None = (str(body["symbol"]), str(body["timeframe"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            key = None  # unreadable: forget everything rather than serve a stale window
        self.invalidate(key)
        self.notifications += 1

    async def _close_listener(self) -> None:
        if self._listener is not None:
            await self._listener.close()

    async def _ensure_listener(self) -> None:
        if self.listening or self._listener is None:
            return
        try:
            await self._listener.connect()
        except Exception as exc:  # stamps are read per request meanwhile; retry next round
            log.warning("cannot LISTEN on %s; reading stamps per request", SERIES_CHANNEL, extra={"error": str(exc)})
            return
        # Changes made while no one listened: forget every stamp held from before.
        self.invalidate()

    async def poll(self) -> None:
        """Re-read the stamps held; a changed (or vanished) one is replaced (dropped)."""
        keys = list(self._stamps)
        if not keys:
            return
        epoch = self._epoch
        fresh = await series_stamps(self.pool, keys)
        if epoch != self._epoch:
            return  # a notification came meanwhile; what it dropped is read again on demand
        for key in keys:
            new = fresh.get(key)
            if new is None:
                self._stamps.pop(key, None)
            elif new != self._stamps.get(key):
                self._stamps[key] = new

    async def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_seconds
        while True:
            await self._ensure_listener()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), max(0.0, next_poll - time.monotonic()))
            if self._lost.is_set():
                self._lost.clear()
                self.invalidate()
                await self._close_listener()
                continue
            next_poll = time.monotonic() + self.poll_seconds
            try:
                await self.poll()
            except Exception as exc:  # the database may be down; requests will say so
                self.invalidate()
                log.warning("series stamp poll failed", extra={"error": str(exc)})

    async def start(self) -> None:
        await self._ensure_listener()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        await self._close_listener()
