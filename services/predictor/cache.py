"""Prediction cache: a small in-process L1 (parsed entries) in front of Redis (shared by every worker and
replica). A dead Redis costs at most one short timeout, then is skipped for a while.

Both tiers use the same key, and an entry lives in either no longer than its `expires_at` (wall clock, set
when computed), so the L1 never serves what Redis would no longer. Identical concurrent misses in one
process share one computation (single flight).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Literal, NotRequired, TypedDict, TypeVar

import numpy as np
import orjson
import redis.asyncio as aioredis

from services.predictor.metrics import CACHE
from services.predictor.signals import ConsensusResult
from shared.cache import CircuitBreaker
from shared.model_metadata import CLASSES
from shared.timeframes import Timeframe

log = logging.getLogger("predictor.cache")

T = TypeVar("T")
CACHE_HIT = CACHE.labels("hit")
CACHE_MISS = CACHE.labels("miss")


def ttl_seconds(timeframe: Timeframe, max_ttl_s: int, now: float | None = None) -> int:
    """`max_ttl_s` or the seconds until the bar now forming closes, whichever is sooner (at least 1)."""
    now = time.time() if now is None else now
    opened = int(timeframe.floor(np.array([int(now)], dtype=np.int64))[0])
    until_close = opened + timeframe.seconds - now
    return max(1, min(max_ttl_s, math.ceil(until_close)))


class TimeframeResult(TypedDict):
    """One timeframe's part of a prediction (`PredictionOut.timeframes`)."""

    status: Literal["ok", "no_model", "insufficient_data"]
    signal: str | None
    confidence: float | None
    model_version: str | None
    probabilities: NotRequired[dict[str, float]]
    bar_ts: NotRequired[str]
    detail: NotRequired[str]


# The response fields an entry renders (prediction_id, variant, cached and quality are spliced per request).
RESPONSE_FIELDS = (
    "symbol",
    "timeframe",
    "signal",
    "confidence",
    "probabilities",
    "model_version",
    "timeframes",
    "consensus",
    "indicator_score",
    "weights_version",
    "risk",
    "bar_ts",
    "generated_at",
)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A computed prediction: the response fields every request it serves shares, its feature window (so a
    cached prediction is logged in full) and its end of life. Redis holds it as JSON of the init fields."""

    symbol: str
    timeframe: str
    signal: str
    confidence: float
    probabilities: dict[str, float]
    model_version: str
    timeframes: dict[str, TimeframeResult]
    consensus: ConsensusResult
    indicator_score: float
    weights_version: str
    risk: dict[str, object]
    bar_ts: str
    generated_at: str
    window_hash: str  # sha256 of the float32 window and its shape
    window_shape: list[int]
    window_b64: str  # the float32 window, row-major
    # Wall clock; both cache tiers keep the entry until then (the L1 cannot read Redis's TTL back).
    expires_at: float
    # Derived once per entry, in process only. Rendering the response fields on every request cost about a
    # tenth of a cached prediction; an L1 hit reuses this.
    rendered: bytes = field(init=False, repr=False, compare=False)
    probability_list: list[float] = field(init=False, repr=False, compare=False)  # CLASSES order, for the log

    def __post_init__(self) -> None:
        object.__setattr__(self, "rendered", orjson.dumps({k: getattr(self, k) for k in RESPONSE_FIELDS}))
        object.__setattr__(self, "probability_list", [self.probabilities[c] for c in CLASSES])

    def to_json(self) -> bytes:
        return orjson.dumps({name: getattr(self, name) for name in _STORED})

    @classmethod
    def from_json(cls, raw: bytes) -> CacheEntry:
        """Raises ValueError or TypeError for what is not an entry of this shape."""
        body = orjson.loads(raw)
        if not isinstance(body, dict):
            raise TypeError(f"a cache entry is a JSON object, not {type(body).__name__}")
        return cls(**body)


_STORED = tuple(f.name for f in fields(CacheEntry) if f.init)


class PredictionCache:
    def __init__(self, client: aioredis.Redis | None, cooldown_s: float, l1_entries: int = 4096) -> None:
        self.client = client
        self.breaker = CircuitBreaker(cooldown_s)
        self._inflight: dict[str, asyncio.Future[object]] = {}
        # key -> (expires_at, entry), oldest insert first; bounded, so unused keys (old stamps, old model
        # versions) leave by age. 0 turns the L1 off.
        self.l1_entries = l1_entries
        self._l1: dict[str, tuple[float, CacheEntry]] = {}
        self.l1_hits = 0  # tests read it

    async def lookup(self, key: str) -> CacheEntry | None:
        """The fresh entry under `key` from the L1, else from Redis (then kept in the L1); None on a miss."""
        held = self._l1.get(key)
        if held is not None:
            if held[0] > time.time():
                self.l1_hits += 1
                CACHE_HIT.inc()
                return held[1]
            del self._l1[key]
        raw = await self.get(key)
        if raw is None:
            return None
        try:
            entry = CacheEntry.from_json(raw)
        except (ValueError, TypeError) as exc:
            # Not an entry this code wrote (CACHE_SCHEMA is in the key, so only a foreign writer): a miss.
            log.warning("unreadable cache entry; recomputing", extra={"key": key, "error": str(exc)})
            return None
        self._l1_put(key, entry)
        return entry

    async def store(self, key: str, entry: CacheEntry, ttl_s: int) -> None:
        self._l1_put(key, entry)
        await self.set(key, entry.to_json(), ttl_s)

    def _l1_put(self, key: str, entry: CacheEntry) -> None:
        if self.l1_entries <= 0:
            return
        expires_at = entry.expires_at
        if expires_at <= time.time():
            return
        self._l1.pop(key, None)
        while len(self._l1) >= self.l1_entries:
            del self._l1[next(iter(self._l1))]
        self._l1[key] = (expires_at, entry)

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
        except Exception as exc:  # a cache failure must never fail a prediction
            self._failed("get", exc)
            return None
        self.breaker.success()
        (CACHE_HIT if value is not None else CACHE_MISS).inc()
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if not self.usable:
            return
        assert self.client is not None
        try:
            await self.client.set(key, value, ex=ttl_s)
        except Exception as exc:
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
