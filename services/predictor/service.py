"""One prediction, end to end: input identity, cache, features, inference, decision rules, the log."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import asyncpg
import numpy as np
import numpy.typing as npt
import orjson

from services.predictor.cache import CacheEntry, PredictionCache, TimeframeResult, ttl_seconds
from services.predictor.drift import DriftMonitor
from services.predictor.features_client import IndicatorsClient, Rows, have_bars
from services.predictor.model_manager import LoadedModel, ModelManager
from services.predictor.prediction_log import LogRecord, PredictionLog
from services.predictor.routing import CANDIDATE, PRODUCTION, SHADOW, route
from services.predictor.series import SeriesStamps
from services.predictor.settings import PredictorSettings
from services.predictor.signals import (
    RiskLimits,
    Weights,
    WeightsBook,
    consensus,
    decide,
    indicator_score,
    risk,
)
from shared.bars import bars_from_items
from shared.db import DATABASE_DOWN
from shared.errors import (
    AppError,
    NotEnoughBars,
    NotFoundError,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationFailed,
)
from shared.model_metadata import CLASSES
from shared.timeframes import Timeframe
from shared.warmup import WARMUP_BARS

# Bump when the cached entry's shape changes, so a deploy never reads entries it does not understand.
CACHE_SCHEMA = "v2"
VARIANT_PRODUCTION = PRODUCTION

log = logging.getLogger("predictor.service")


class NoModel(NotFoundError):
    code = "no_model"


# The code the predictor has always answered for too few bars (clients switch on it).
NOT_ENOUGH_BARS = "not_enough_bars"


@dataclass(frozen=True, slots=True)
class PredictionRequest:
    symbol: str
    timeframe: Timeframe
    targets: list[Timeframe]  # the request's timeframe first, then the others, without repeats
    bars: list[Any] | None
    user_id: str | None
    use_cache: bool = True
    # Without a user id, the A/B split buckets the request id. A signal computed at bar close for every
    # subscriber (services/predictor/streaming.py) turns that off: the shared event is production's.
    split_by_request_id: bool = True


class Inference(NamedTuple):
    """One timeframe's model output on its window."""

    signal: str
    confidence: float  # unrounded: the decision rules take it as it is
    probabilities: dict[str, float]  # rounded to 6 places, as served
    window: npt.NDArray[np.float64]
    rows: Rows


def uuid7() -> uuid.UUID:
    """A random UUID whose first 48 bits are the Unix time in ms (RFC 9562 version 7): as unguessable as a
    uuid4 (74 random bits from the OS), but ids of successive predictions sort together, so the primary-key
    index of the prediction log grows at its end instead of splitting pages at random."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    return uuid.UUID(int=(ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)


@functools.lru_cache(maxsize=4096)  # the same few keys are asked for again and again
def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _window_fields(window: npt.NDArray[np.float64]) -> tuple[str, list[int], str]:
    """The logged form of a feature window: sha256 of the float32 values and shape, the shape, base64."""
    w32 = np.ascontiguousarray(window, dtype=np.float32)
    return (
        hashlib.sha256(w32.tobytes() + str(w32.shape).encode()).hexdigest(),
        list(w32.shape),
        base64.b64encode(w32.tobytes()).decode(),
    )


def _no_signal(status: Literal["no_model", "insufficient_data"], version: str | None, detail: str) -> TimeframeResult:
    return {"status": status, "signal": None, "confidence": None, "model_version": version, "detail": detail}


class Predictor:
    def __init__(
        self,
        settings: PredictorSettings,
        pool: asyncpg.Pool,
        models: ModelManager,
        cache: PredictionCache,
        features: IndicatorsClient,
        log: PredictionLog,
        weights: WeightsBook,
        series: SeriesStamps,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.models = models
        self.cache = cache
        self.features = features
        self.log = log
        self.weights = weights
        self.series = series
        # Set by the app (main.py); counts the newest feature row of each computed prediction for drift checks.
        self.drift: DriftMonitor | None = None
        self.salt = settings.user_id_salt.get_secret_value().encode()
        self.rollout_salt = settings.rollout_salt
        self.shadow_failures = 0  # shadow scorings that raised (logged; they never touch a response)
        self.limits = RiskLimits(
            settings.risk_max_position_fraction,
            settings.risk_per_trade_fraction,
            settings.risk_stop_atr_multiple,
            settings.risk_take_profit_atr_multiple,
        )

    def select_model(
        self, symbol: str, timeframe: str, user_id: str | None, request_id: str | None
    ) -> tuple[LoadedModel, str]:
        """The model that serves a request and its variant, "production" or "candidate": the series' rollout
        decides (services/predictor/routing.py) when its candidate is loaded; otherwise production. Only the
        request's own timeframe is routed: the other timeframes of a consensus are always production."""
        candidate = self.models.candidate(symbol, timeframe)
        if candidate is not None:
            rollout = self.models.rollout(symbol, timeframe)
            if route(rollout, symbol, user_id, request_id, self.rollout_salt) == CANDIDATE:
                return candidate, CANDIDATE
        model = self.models.get(symbol, timeframe)
        if model is None:
            raise NoModel(f"no production model for {symbol} {timeframe}; train and promote one first")
        return model, PRODUCTION

    def shadow_model(self, symbol: str, timeframe: str, variant: str) -> LoadedModel | None:
        """The candidate that shadows a production-served request: when the rollout has shadow on and its
        candidate is loaded."""
        if variant != PRODUCTION:
            return None
        candidate = self.models.candidate(symbol, timeframe)
        if candidate is None:
            return None
        rollout = self.models.rollout(symbol, timeframe)
        return candidate if rollout is not None and rollout.shadow else None

    def hash_user(self, user_id: str | None) -> str | None:
        if user_id is None:
            return None
        return hashlib.sha256(self.salt + user_id.encode()).hexdigest()

    async def predict(self, req: PredictionRequest, request_id: str | None) -> bytes:
        """The JSON response body of one prediction (PredictionOut)."""
        tf = req.timeframe.value
        route_key = request_id if req.split_by_request_id else None
        primary, variant = self.select_model(req.symbol, tf, req.user_id, route_key)
        shadow = self.shadow_model(req.symbol, tf, variant)
        models = self._models_for(req, primary)
        weights = self.weights.lookup(req.symbol, tf)
        versions = ",".join(f"{t}={m.version if m else '-'}" for t, m in models.items())
        for _attempt in range(3):
            epoch = self.series.epoch
            input_id, close = await self._input(req, tf)
            key = (
                f"pred:{CACHE_SCHEMA}:{req.symbol}:{tf}:{primary.version}:"
                f"{_digest(versions, variant, weights.cache_token, input_id)}"
            )
            hit = await self.cache.lookup(key) if req.use_cache else None
            if hit is None:
                break
            # A series' bars changed while this request looked (a Redis round trip): its stamp may be the old
            # one, and nothing computed on old bars is served once the notification is processed. Look again.
            if req.bars is not None or self.series.epoch == epoch:
                return self._serve(hit, primary, req, variant, True, request_id)
        entry, _shared = await self.cache.single_flight(
            key, lambda: self._compute(req, models, weights, close, key, shadow, request_id)
        )
        return self._serve(entry, primary, req, variant, False, request_id)

    def _models_for(self, req: PredictionRequest, primary: LoadedModel) -> dict[str, LoadedModel | None]:
        """The model of each requested timeframe (None where none serves), the request's own first."""
        models: dict[str, LoadedModel | None] = {req.timeframe.value: primary}
        for t in req.targets[1:]:
            models[t.value] = self.models.get(req.symbol, t.value)
        return models

    async def _input(self, req: PredictionRequest, tf: str) -> tuple[str, float]:
        """What identifies the input window (part of the cache key) and the close of its newest bar."""
        if req.bars is not None:
            if len(req.bars) > self.settings.max_bars_per_request:
                raise PayloadTooLarge(
                    f"{len(req.bars)} bars in one request; the limit is {self.settings.max_bars_per_request}"
                )
            if not req.bars:
                raise ValidationFailed("bars is empty; send bars or leave the field out to use stored bars")
            ohlcv, _ = bars_from_items(req.bars, req.timeframe)
            h = hashlib.sha256()
            for col in (ohlcv.ts, ohlcv.open, ohlcv.high, ohlcv.low, ohlcv.close, ohlcv.volume):
                h.update(col.tobytes())
            return "bars:" + h.hexdigest()[:32], float(ohlcv.close[-1])
        try:
            stamp = await self.series.get(req.symbol, tf)
        except (*DATABASE_DOWN, asyncpg.PostgresError) as exc:
            raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}; try again later") from None
        if stamp is None:
            raise NotFoundError(f"no {tf} bars stored for {req.symbol}; upload bars or send them in the request")
        # The newest bar and the last change to any bar of the series identify the stored window.
        return f"stored:{stamp.last_ts}:{stamp.updated_at.timestamp()}", stamp.close

    async def _compute(
        self,
        req: PredictionRequest,
        models: dict[str, LoadedModel | None],
        weights: Weights,
        close: float,
        key: str,
        shadow: LoadedModel | None = None,
        request_id: str | None = None,
    ) -> CacheEntry:
        """Features, inference per timeframe, decision rules; the entry is cached before it is returned.

        With a `shadow` model, it scores the request timeframe's rows too, after the response is built
        (`_shadow_soon`). This runs once per computed entry (a cache miss or a no-cache request), never for a
        cached hit, so a shadow logs one prediction per bar and input, not one per request."""
        tf = req.timeframe.value
        served = {t: m for t, m in models.items() if m is not None}
        need = max([m.sequence_length for m in served.values()] + ([shadow.sequence_length] if shadow else []))
        rows = await self._features(req, list(served), need)
        if self.drift is not None:
            self.drift.observe(req.symbol, rows)  # queued in memory; its own loop writes Redis
        per_tf: dict[str, TimeframeResult] = {}
        signals: dict[str, tuple[str, float]] = {}
        primary: Inference | None = None
        for t, model in models.items():
            if model is None:
                per_tf[t] = _no_signal("no_model", None, f"no production model for {req.symbol} {t}")
                continue
            result, inference = self._run_timeframe(req, t, model, rows[t])
            per_tf[t] = result
            if inference is not None:
                signals[t] = (inference.signal, inference.confidence)
                if t == tf:
                    primary = inference
        # The request's own timeframe either produced a signal or raised in _run_timeframe.
        assert primary is not None
        ttl_s = ttl_seconds(req.timeframe, self.settings.cache_ttl_seconds)
        entry = self._entry(req, served[tf], primary, per_tf, signals, weights, close, time.time() + ttl_s)
        # A no-cache request still refreshes the entry for the requests after it.
        await self.cache.store(key, entry, ttl_s)
        if shadow is not None:
            self._shadow_soon(req, shadow, primary.rows, request_id)
        return entry

    def _shadow_soon(self, req: PredictionRequest, model: LoadedModel, rows: Rows, request_id: str | None) -> None:
        """Score `model` on the request's rows in a callback of its own. Nothing awaits between here and the
        response being rendered (and, with uvicorn, usually written), so the callback runs after that, on the
        same event loop: it adds its CPU (about 45 µs) to the process, not to this response's latency
        (benchmarks/bench_shadow.py measures both)."""
        asyncio.get_running_loop().call_soon(self._score_shadow, req, model, rows, request_id)

    def _score_shadow(self, req: PredictionRequest, model: LoadedModel, rows: Rows, request_id: str | None) -> None:
        """Log the shadow's prediction (variant shadow, the candidate's version); it is never returned."""
        try:
            missing = [n for n in model.feature_names if n not in rows.names]
            if missing or len(rows) < model.sequence_length:
                log.warning(
                    "shadow skipped: the rows do not fit the candidate",
                    extra={"version": model.version, "missing": missing, "rows": len(rows)},
                )
                return
            window = rows.window(model.feature_names, model.sequence_length)
            p = model.predict(window)
            signal, confidence = decide(p.tolist())
            window_hash, shape, b64 = _window_fields(window)
            self.log.append(
                LogRecord(
                    uuid7(),
                    time.time(),
                    req.symbol,
                    req.timeframe.value,
                    rows.ts[-1],
                    model.version,
                    SHADOW,
                    self.hash_user(req.user_id),
                    window_hash,
                    b64,
                    shape,
                    [round(float(x), 6) for x in p],
                    signal,
                    round(confidence, 6),
                    signal,  # one timeframe scored: its consensus is its own signal
                    False,
                    request_id,
                )
            )
        except Exception:  # a shadow must never disturb serving
            self.shadow_failures += 1
            log.exception("shadow scoring failed", extra={"version": model.version})

    def _run_timeframe(
        self, req: PredictionRequest, t: str, model: LoadedModel, got: Rows | AppError
    ) -> tuple[TimeframeResult, Inference | None]:
        """One timeframe's result. The request's own timeframe raises where another reports no signal."""
        own = t == req.timeframe.value
        if isinstance(got, AppError):
            if own:
                raise self._not_enough(got, req, t, model) if isinstance(got, ValidationFailed) else got
            return _no_signal("insufficient_data", model.version, got.message), None
        if len(got) < model.sequence_length:
            err = self._not_enough(None, req, t, model, rows_have=len(got))
            if own:
                raise err
            return _no_signal("insufficient_data", model.version, err.message), None
        missing = [n for n in model.feature_names if n not in got.names]
        if missing:
            raise ServiceUnavailable(
                f"model {model.version} needs features the indicators service does not provide: {missing}"
            )
        window = got.window(model.feature_names, model.sequence_length)
        p = model.predict(window)
        signal, confidence = decide(p.tolist())
        probabilities = {c: round(float(p[i]), 6) for i, c in enumerate(CLASSES)}
        result: TimeframeResult = {
            "status": "ok",
            "signal": signal,
            "confidence": round(confidence, 6),
            "model_version": model.version,
            "probabilities": probabilities,
            "bar_ts": got.ts[-1],
        }
        return result, Inference(signal, confidence, probabilities, window, got)

    def _entry(
        self,
        req: PredictionRequest,
        model: LoadedModel,
        primary: Inference,
        per_tf: dict[str, TimeframeResult],
        signals: dict[str, tuple[str, float]],
        weights: Weights,
        close: float,
        expires_at: float,
    ) -> CacheEntry:
        """The decision rules on the request timeframe's newest feature row, and the window to log."""
        rows = primary.rows
        latest = dict(zip(rows.names, rows.values[-1].tolist(), strict=True))
        window_hash, window_shape, window_b64 = _window_fields(primary.window)
        return CacheEntry(
            symbol=req.symbol,
            timeframe=req.timeframe.value,
            signal=primary.signal,
            confidence=round(primary.confidence, 6),
            probabilities=primary.probabilities,
            model_version=model.version,
            timeframes=per_tf,
            consensus=consensus(signals),
            indicator_score=indicator_score(latest, weights.weights),
            weights_version=weights.version,
            risk=risk(
                primary.signal, primary.confidence, close, float(latest.get("atr_14_pct", float("nan"))), self.limits
            ),
            bar_ts=rows.ts[-1],
            generated_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            window_hash=window_hash,
            window_shape=window_shape,
            window_b64=window_b64,
            expires_at=expires_at,
        )

    def _not_enough(
        self, err: AppError | None, req: PredictionRequest, t: str, model: LoadedModel, rows_have: int | None = None
    ) -> AppError:
        need = WARMUP_BARS + model.sequence_length
        have = have_bars(err.message) if err is not None else None
        if have is None and rows_have is not None:
            have = WARMUP_BARS + rows_have
        if err is not None and have is None:
            return err  # not about the count of bars: pass the indicators service's message on
        source = f"{t} bars" if t == req.timeframe.value else f"completed {t} bars (from {req.timeframe.value})"
        return NotEnoughBars(
            f"need at least {need} {source} for {req.symbol} ({WARMUP_BARS} warm-up + {model.sequence_length} "
            f"for model {model.version}'s input window), have {have}",
            code=NOT_ENOUGH_BARS,
        )

    async def _features(self, req: PredictionRequest, targets: list[str], limit: int) -> dict[str, Rows | AppError]:
        async def call(ts: list[str]) -> dict[str, Rows]:
            if req.bars is None:
                return await self.features.stored(req.symbol, req.timeframe.value, ts, limit)
            return await self.features.from_bars(req.symbol, req.timeframe.value, ts, limit, req.bars)

        try:
            return dict(await call(targets))
        except (ValidationFailed, NotFoundError) as exc:
            if len(targets) == 1:
                return {targets[0]: exc}
        # One timeframe lacks data: ask per timeframe, so the others still give their signals.
        out: dict[str, Rows | AppError] = {}
        for t in targets:
            try:
                out.update(await call([t]))
            except (ValidationFailed, NotFoundError) as exc:
                out[t] = exc
        return out

    def _serve(
        self,
        entry: CacheEntry,
        model: LoadedModel,
        req: PredictionRequest,
        variant: str,
        cached: bool,
        request_id: str | None,
    ) -> bytes:
        """Log the prediction and render its response: the entry's rendered fields, shared by every request
        it serves, with the per-request ones spliced in front. `quality` comes from the model object this
        request selected, so a changed verdict shows on the next request, cached or not."""
        prediction_id = uuid7()
        self.log.append(
            LogRecord(
                prediction_id,
                time.time(),
                entry.symbol,
                entry.timeframe,
                entry.bar_ts,
                entry.model_version,
                variant,
                self.hash_user(req.user_id),
                entry.window_hash,
                entry.window_b64,
                entry.window_shape,
                entry.probability_list,
                entry.signal,
                entry.confidence,
                entry.consensus["signal"],
                cached,
                request_id,
            )
        )
        head = orjson.dumps({"prediction_id": str(prediction_id), "variant": variant, "cached": cached})
        return b"".join((head[:-1], b',"quality":', model.quality_json, b",", entry.rendered[1:]))
