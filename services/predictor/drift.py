"""Feature drift: live feature distributions against the production model's training reference.

Counting (docs/LIFECYCLE.md, "Drift"): the newest feature row of every computed prediction, once per
(symbol, timeframe, bar) in this process, queued in memory (`observe`, a dict lookup on the request path).
Every DRIFT_FLUSH_SECONDS the queue is binned into the production model's reference bins and written to Redis
by one Lua call per bar: SET NX of a per-bar key, and only if that key was new, HINCRBY of the bar's bins into
the bucket of the bar's own open hour. Replicas that counted the same bar add it once; a flush that failed
half-way is retried whole (the bars already written are seen and skipped). Redis errors leave the queue in
memory (bounded), never reach a request.

Checking: every DRIFT_CHECK_INTERVAL_SECONDS one replica (a Redis lock with expiry) reads the buckets of the
window, computes PSI and KS per feature, stores feature_drift rows and sets model_flags.drift. A feature drifts
when its PSI or KS exceeds max(fixed threshold, the null threshold the trainer measured on the model's training
rows for this window size) (shared/drift.py). Every replica refreshes the `ml_feature_drift` gauges from the
newest feature_drift rows, so the gauges agree across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis

from services.predictor import repository
from services.predictor.features_client import Rows
from services.predictor.metrics import FEATURE_DRIFT, FEATURE_DRIFT_KS, FEATURE_DRIFTED
from services.predictor.model_manager import ModelManager
from services.predictor.settings import PredictorSettings
from shared import drift as rules
from shared.background import cancel_and_wait
from shared.errors import AppError
from shared.model_metadata import ReferenceDistribution
from shared.timeframes import Timeframe

log = logging.getLogger("predictor.drift")

FloatArray = npt.NDArray[np.float64]

PSI_EPSILON = rules.PSI_EPSILON
# A series is judged only with at least this many counted bars in its window (docs: "Minimum").
MIN_LIVE_BARS_FLOOR = 30
# Bars queued while Redis is unreachable; beyond it the oldest are dropped (and logged).
MAX_PENDING_BARS = 20_000
# Buckets and per-bar keys outlive the window by this much, so a check at the window's edge still reads them.
KEY_MARGIN_SECONDS = 7200
# How often every replica tries the check lock and refreshes its gauges; the lock's expiry (the check interval)
# makes one replica check per interval.
TICK_SECONDS = 60.0

# KEYS[1] per-bar key, KEYS[2] bucket; ARGV[1] expiry (epoch s) of both, ARGV[2..] the bar's fields.
# Redis' own scripting, not a hand-written protocol: SET NX and the HINCRBYs are one atomic step, so a bar is
# counted exactly once whatever fails between calls.
_COUNT_BAR = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EXAT', ARGV[1]) then
  for i = 2, #ARGV do redis.call('HINCRBY', KEYS[2], ARGV[i], 1) end
  redis.call('HINCRBY', KEYS[2], 'n', 1)
  redis.call('EXPIREAT', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def window_seconds(timeframe: Timeframe, settings: PredictorSettings) -> int:
    """DRIFT_WINDOW_HOURS, or the last DRIFT_MIN_BARS bars of a slow timeframe (H1: 50 h, D1: 50 days); the rule
    the trainer calibrates with (shared/drift.py)."""
    return rules.window_seconds(timeframe, settings.drift_window_hours, settings.drift_min_bars)


def window_bars(timeframe: Timeframe, settings: PredictorSettings) -> int:
    return rules.window_bars(timeframe, settings.drift_window_hours, settings.drift_min_bars)


def min_live_bars(settings: PredictorSettings) -> int:
    """Half the bars a slow timeframe's widened window holds (a few unrequested bars do not skip the check),
    never fewer than 30."""
    return max(MIN_LIVE_BARS_FLOOR, settings.drift_min_bars // 2)


def bucket_seconds(timeframe: Timeframe) -> int:
    """Hourly buckets; a bar longer than an hour is a bucket of its own."""
    return max(3600, timeframe.seconds)


def bucket_start(timeframe: Timeframe, bar_ts: int) -> int:
    if timeframe.seconds >= 3600:
        return int(timeframe.floor(np.array([bar_ts], dtype=np.int64))[0])
    return bar_ts - bar_ts % 3600


def bucket_key(prefix: str, symbol: str, timeframe: str, version: str, start: int) -> str:
    return f"{prefix}:{symbol}:{timeframe}:{version}:{datetime.fromtimestamp(start, UTC):%Y%m%d%H}"


def bins_of(ref: ReferenceDistribution, values: FloatArray) -> npt.NDArray[np.int64]:
    """The reference bin of each value (shared/drift.py: outer bins open-ended, an edge goes to the bin above)."""
    return rules.bins_of(ref, values)


def psi(live: FloatArray, ref: FloatArray, eps: float = PSI_EPSILON) -> float:
    """Population stability index: sum((live - ref) * ln(live / ref)) over the bins, shares floored at eps."""
    return float(rules.psi_rows(live, ref, eps))


def binned_ks(live: FloatArray, ref: FloatArray) -> float:
    """max |CDF_live - CDF_ref| at the bin edges. Both CDFs are exact at the edges, and the supremum over all
    values is at least the maximum over some of them: a lower bound of the exact two-sample KS statistic."""
    return float(rules.ks_rows(live, ref))


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks: float
    drifted: bool
    psi_threshold: float  # what PSI had to exceed: max(DRIFT_PSI_THRESHOLD, the model's null threshold)
    ks_threshold: float


@dataclass
class SeriesDrift:
    """One series' check: `status` checked | insufficient | no_reference."""

    symbol: str
    timeframe: str
    version: str
    status: str
    live_bars: int
    window_start: datetime
    window_end: datetime
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drifted(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.drifted]


@dataclass(frozen=True)
class _Bar:
    symbol: str
    timeframe: str
    bar_ts: int
    names: tuple[str, ...]
    row: tuple[float, ...]


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


class DriftMonitor:
    def __init__(
        self,
        settings: PredictorSettings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis | None,
        models: ModelManager,
        *,
        key_prefix: str = "drift",
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.models = models
        self.prefix = key_prefix
        # The newest bar queued per series: a bar asked for by many requests is queued once per process.
        self._last: dict[tuple[str, str], str] = {}
        self._pending: OrderedDict[tuple[str, str, int], _Bar] = OrderedDict()
        self.dropped = 0
        self.last_error: str | None = None
        self.last_check: list[SeriesDrift] = []
        self._script = redis.register_script(_COUNT_BAR) if redis is not None else None
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: set[tuple[str, str, str]] = set()

    # --- counting -------------------------------------------------------------------------------------

    def observe(self, symbol: str, rows: Mapping[str, Rows | AppError]) -> None:
        """Queue the newest feature row of each timeframe of one computed prediction (request path: no I/O)."""
        if self._script is None:
            return
        for tf, got in rows.items():
            if isinstance(got, AppError) or len(got) == 0:
                continue
            ts = got.ts[-1]
            if self._last.get((symbol, tf)) == ts:
                continue
            self._last[(symbol, tf)] = ts
            key = (symbol, tf, _epoch(ts))
            if key in self._pending:
                continue
            self._pending[key] = _Bar(symbol, tf, key[2], tuple(got.names), tuple(got.values[-1].tolist()))
            if len(self._pending) > MAX_PENDING_BARS:
                self._pending.popitem(last=False)
                self.dropped += 1
                if self.dropped % 1000 == 1:
                    log.warning("drift queue full; oldest bars dropped", extra={"dropped": self.dropped})

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self, now: float | None = None) -> int:
        """Count the queued bars into Redis; returns how many were new there (not counted by any replica)."""
        if self._script is None or self.redis is None or not self._pending:
            return 0
        now = time.time() if now is None else now
        batch = list(self._pending.items())
        calls: list[tuple[list[str], list[Any]]] = []
        for _key, bar in batch:
            call = self._count_call(bar, now)
            if call is not None:
                calls.append(call)
        added = 0
        if calls:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        await self._script(keys=keys, args=args, client=pipe)
                    results = await pipe.execute()
            except Exception as exc:  # Redis down or slow: keep the queue, retry next flush
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("drift counts not flushed; kept in memory", extra={"error": self.last_error})
                return 0
            added = sum(int(r) for r in results)
        self.last_error = None
        for key, _bar in batch:
            self._pending.pop(key, None)
        return added

    def _count_call(self, bar: _Bar, now: float) -> tuple[list[str], list[Any]] | None:
        """The script's keys and args for one bar, or None when it cannot count (no model, outside the window)."""
        model = self.models.get(bar.symbol, bar.timeframe)
        if model is None or not model.metadata.reference_distributions:
            return None
        tf = Timeframe(bar.timeframe)
        win = window_seconds(tf, self.settings)
        # A bar that no window will hold (a client replaying history) or one from the future is not live input.
        if bar.bar_ts < now - win or bar.bar_ts > now + tf.seconds:
            return None
        values = dict(zip(bar.names, bar.row, strict=True))
        fields: list[Any] = []
        for name, ref in model.metadata.reference_distributions.items():
            v = values.get(name)
            if v is None or not math.isfinite(v):
                continue
            fields.append(f"{name}:{int(bins_of(ref, np.array([v]))[0])}")
        start = bucket_start(tf, bar.bar_ts)
        expire = start + bucket_seconds(tf) + win + KEY_MARGIN_SECONDS
        keys = [
            f"{self.prefix}:seen:{bar.symbol}:{bar.timeframe}:{bar.bar_ts}",
            bucket_key(self.prefix, bar.symbol, bar.timeframe, model.version, start),
        ]
        return keys, [expire, *fields]

    # --- checking -------------------------------------------------------------------------------------

    async def live_counts(
        self, symbol: str, timeframe: str, version: str, now: float
    ) -> tuple[int, dict[str, dict[int, int]], int]:
        """(bars, {feature: {bin: count}}, window start) summed over the window's buckets."""
        assert self.redis is not None
        tf = Timeframe(timeframe)
        start = int(now) - window_seconds(tf, self.settings)
        step = bucket_seconds(tf)
        first, last = bucket_start(tf, start), bucket_start(tf, int(now))
        keys = [bucket_key(self.prefix, symbol, timeframe, version, s) for s in range(first, last + 1, step)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hgetall(k)
            buckets = await pipe.execute()
        n = 0
        counts: dict[str, dict[int, int]] = {}
        for bucket in buckets:
            for raw_field, raw_value in bucket.items():
                name = raw_field.decode()
                value = int(raw_value)
                if name == "n":
                    n += value
                    continue
                feature, _, b = name.rpartition(":")
                per = counts.setdefault(feature, {})
                per[int(b)] = per.get(int(b), 0) + value
        return n, counts, first

    async def check(self, now: float | None = None) -> list[SeriesDrift]:
        """PSI and KS per feature for every served series, stored; drifted series flagged. No lock: see tick."""
        now = time.time() if now is None else now
        out: list[SeriesDrift] = []
        for (symbol, timeframe), model in sorted(self.models.models.items()):
            refs = model.metadata.reference_distributions
            end = datetime.fromtimestamp(now, UTC)
            if not refs:
                out.append(SeriesDrift(symbol, timeframe, model.version, "no_reference", 0, end, end))
                continue
            n, counts, first = await self.live_counts(symbol, timeframe, model.version, now)
            self._warn_window_mismatch(symbol, timeframe, model.version, refs)
            begin = datetime.fromtimestamp(first, UTC)
            result = SeriesDrift(symbol, timeframe, model.version, "checked", n, begin, end)
            if n < min_live_bars(self.settings):
                result.status = "insufficient"
                out.append(result)
                continue
            for feature, ref in refs.items():
                ref_shares = np.asarray(ref.shares, dtype=np.float64)
                live = np.zeros(len(ref_shares))
                for b, c in counts.get(feature, {}).items():
                    if 0 <= b < len(live):
                        live[b] += c
                total = live.sum()
                if total <= 0:
                    continue
                live /= total
                p, k = psi(live, ref_shares), binned_ks(live, ref_shares)
                # Judged on the bars this feature was counted in (a non-finite value is not counted).
                tp, tk = rules.effective_thresholds(
                    ref, int(total), self.settings.drift_psi_threshold, self.settings.drift_ks_threshold
                )
                result.features.append(FeatureDrift(feature, p, k, p > tp or k > tk, tp, tk))
            out.append(result)
        checked = [r for r in out if r.status == "checked"]
        async with self.pool.acquire() as conn, conn.transaction():
            for r in checked:
                await repository.insert_feature_drift(
                    conn,
                    [
                        (
                            r.symbol,
                            r.timeframe,
                            r.version,
                            f.feature,
                            f.psi,
                            f.ks,
                            r.live_bars,
                            r.window_start,
                            r.window_end,
                            f.drifted,
                        )
                        for f in r.features
                    ],
                )
                if r.drifted:
                    await repository.flag_drift(conn, r.symbol, r.timeframe, drift_reason(r, self.settings))
        for r in out:
            log.info(
                "drift check",
                extra={
                    "symbol": r.symbol,
                    "timeframe": r.timeframe,
                    "version": r.version,
                    "status": r.status,
                    "live_bars": r.live_bars,
                    "drifted": [f.feature for f in r.drifted],
                },
            )
        self.last_check = out
        await self.refresh_gauges()
        return out

    def _warn_window_mismatch(
        self, symbol: str, timeframe: str, version: str, refs: Mapping[str, ReferenceDistribution]
    ) -> None:
        """Once per model version: its null thresholds were measured for another window than this predictor's
        (DRIFT_WINDOW_HOURS / DRIFT_MIN_BARS differ from the trainer's shared/drift.py defaults). They still
        apply, rescaled for the bars counted (shared.drift.effective_thresholds), or are absent (fixed ones)."""
        key = (symbol, timeframe, version)
        if key in self._warned:
            return
        self._warned.add(key)
        own = window_bars(Timeframe(timeframe), self.settings)
        calibrated = {r.null_window_bars for r in refs.values()}
        if calibrated == {own}:
            return
        log.warning(
            "drift null thresholds not measured for this window: rescaled, or fixed thresholds where absent",
            extra={
                "symbol": symbol,
                "timeframe": timeframe,
                "version": version,
                "window_bars": own,
                "null_window_bars": sorted(calibrated, key=lambda b: -1 if b is None else b),
            },
        )

    async def refresh_gauges(self) -> None:
        """Set the gauges from the newest stored check of each served series (every replica, whoever checked)."""
        served = [(s, t, m.version) for (s, t), m in self.models.models.items()]
        if not served:
            return
        max_age = 3 * self.settings.drift_check_interval_seconds + 3600
        rows = await repository.latest_feature_drift(self.pool, served, max_age)
        for symbol, timeframe, feature, p, k, drifted in rows:
            FEATURE_DRIFT.labels(symbol, timeframe, feature).set(p)
            FEATURE_DRIFT_KS.labels(symbol, timeframe, feature).set(k)
            FEATURE_DRIFTED.labels(symbol, timeframe, feature).set(1.0 if drifted else 0.0)

    async def try_check(self) -> list[SeriesDrift] | None:
        """Check if no replica has in this interval (a Redis lock that expires with it); None when skipped."""
        if self.redis is None:
            return None
        ttl = max(1, int(self.settings.drift_check_interval_seconds))
        lock = f"{self.prefix}:check-lock"
        if not await self.redis.set(lock, b"1", nx=True, ex=ttl):
            return None
        try:
            return await self.check()
        except Exception:
            # PostgreSQL (or Redis) failed mid-check: let the next tick of any replica try again.
            with contextlib.suppress(Exception):
                await self.redis.delete(lock)
            raise

    # --- loops ----------------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.drift_flush_seconds)
            try:
                await self.flush()  # logs and keeps the queue on Redis errors
            except Exception:  # anything else: log it and go on counting; the loop must not die silently
                log.exception("drift flush failed; the queued bars are kept for the next one")

    async def _check_loop(self) -> None:
        tick = min(TICK_SECONDS, self.settings.drift_check_interval_seconds)
        while True:
            # Jittered, so replicas started together do not all ask for the lock at once.
            await asyncio.sleep(tick * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not security
            try:
                await self.try_check()
                await self.refresh_gauges()
            except Exception as exc:  # Redis or PostgreSQL down: next tick
                log.warning("drift check failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    def start(self) -> None:
        if self.redis is None:
            log.warning("no REDIS_URL: feature drift is not tracked")
            return
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="drift flush"),
            asyncio.create_task(self._check_loop(), name="drift check"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2.0)


def drift_reason(r: SeriesDrift, settings: PredictorSettings) -> str:
    """model_flags.reason for a drifted series (no ';': the reason column may also hold a performance reason)."""
    parts = ", ".join(
        f"{f.feature} (PSI {f.psi:.3f} of {f.psi_threshold:.3f}, KS {f.ks:.3f} of {f.ks_threshold:.3f})"
        for f in r.drifted
    )
    return (
        f"drift: {parts} on {r.live_bars} bars since {r.window_start:%Y-%m-%d %H:%M}Z, model {r.version} "
        f"(thresholds: max of PSI {settings.drift_psi_threshold} / KS {settings.drift_ks_threshold} and the "
        "model's null thresholds)"
    )
