"""Prediction cache in Redis: a dead Redis costs at most one short timeout, then is skipped for a while.

Identical concurrent misses in one process share one computation (single flight).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import redis.asyncio as aioredis

from services.predictor.metrics import CACHE
from shared.cache import CircuitBreaker
from shared.timeframes import Timeframe

log = logging.getLogger("predictor.cache")

T = TypeVar("T")


def ttl_seconds(timeframe: Timeframe, max_ttl_s: int, now: float | None = None) -> int:
    """`max_ttl_s` or the seconds until the bar now forming closes, whichever is sooner (at least 1)."""
    now = time.time() if now is None else now
    opened = int(timeframe.floor(np.array([int(now)], dtype=np.int64))[0])
    until_close = opened + timeframe.seconds - now
    return max(1, min(max_ttl_s, math.ceil(until_close)))


class PredictionCache:
    def __init__(self, client: aioredis.Redis | None, cooldown_s: float) -> None:
        self.client = client
        self.breaker = CircuitBreaker(cooldown_s)
        self._inflight: dict[str, asyncio.Future[object]] = {}

    @property
    def usable(self) -> bool:
        return self.client is not None and not self.breaker.open

    async def get(self, key: str) -> bytes | None:
        if self.client is None:
            return None
        if self.breaker.open:
            CACHE.labels("error").inc()
            return None
        try:
            value = await self.client.get(key)
        except Exception as exc:  # noqa: BLE001 - a cache failure must never fail a prediction
            self._failed("get", exc)
            return None
        self.breaker.success()
        CACHE.labels("hit" if value is not None else "miss").inc()
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if not self.usable:
            return
        assert self.client is not None
        try:
            await self.client.set(key, value, ex=ttl_s)
        except Exception as exc:  # noqa: BLE001
            self._failed("set", exc)

    def _failed(self, op: str, exc: Exception) -> None:
        CACHE.labels("error").inc()
        if not self.breaker.open:
            log.warning(
                "redis %s failed; cache skipped for %.1f s",
                op,
                self.breaker.cooldown_s,
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
        self.breaker.failure()

    async def ping(self) -> None:
        if self.client is None:
            raise RuntimeError("REDIS_URL is not set: predictions are not cached")
        await self.client.ping()

    async def single_flight(self, key: str, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run `compute` once for concurrent callers of the same key; returns (result, shared)."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True  # type: ignore[arg-type]
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            # Mark it retrieved: callers that joined re-raise it; if none joined, asyncio must not warn.
            future.exception()
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            self._inflight.pop(key, None)
