"""One prediction, end to end: input identity, cache, features, inference, decision rules, the log."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
import orjson

from services.predictor.cache import PredictionCache, ttl_seconds
from services.predictor.features_client import IndicatorsClient, Rows, have_bars
from services.predictor.models import LoadedModel, ModelManager
from services.predictor.prediction_log import PredictionLog
from services.predictor.series import SeriesStamps
from services.predictor.settings import PredictorSettings
from services.predictor.signals import RiskLimits, WeightsBook, consensus, decide, indicator_score, risk
from shared.bars import bars_from_items
from shared.errors import AppError, NotFoundError, PayloadTooLarge, ServiceUnavailable, ValidationFailed
from shared.model_metadata import CLASSES
from shared.timeframes import Timeframe

# Rows the indicators service withholds at the start of any series (shared.features.WARMUP_BARS; that module
# imports TA-Lib, which the predictor does not load). tests/predictor checks the two agree.
WARMUP_BARS = 500
# Bump when the cached entry's shape changes, so a deploy never reads entries it does not understand.
CACHE_SCHEMA = "v2"
VARIANT_PRODUCTION = "production"


# Response fields that come from the cache entry as they are (prediction_id, variant, cached are per request).
_RESPONSE_FIELDS = (
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
# Where an entry keeps its rendered response fields (in process only; never written to Redis).
_RENDERED = "_rendered_response"


class NotEnoughBars(ValidationFailed):
    code = "not_enough_bars"


class NoModel(NotFoundError):
    code = "no_model"


@dataclass(frozen=True)
class PredictionRequest:
    symbol: str
    timeframe: Timeframe
    targets: list[Timeframe]  # the request's timeframe first, then the others, without repeats
    bars: list[Any] | None
    user_id: str | None
    use_cache: bool = True


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


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
        self.salt = settings.user_id_salt.get_secret_value().encode()
        self.limits = RiskLimits(
            settings.risk_max_position_fraction,
            settings.risk_per_trade_fraction,
            settings.risk_stop_atr_multiple,
            settings.risk_take_profit_atr_multiple,
        )
        # Computations actually run (not cache hits, not joined single flights); tests read it.
        self.computations = 0

    # The one place that picks what serves a request: a later A/B router replaces this method.
    def select_model(self, symbol: str, timeframe: str, user_id: str | None) -> tuple[LoadedModel, str]:
        del user_id  # the A/B router will bucket on the hashed user id
        model = self.models.get(symbol, timeframe)
        if model is None:
            raise NoModel(f"no production model for {symbol} {timeframe}; train and promote one first")
        return model, VARIANT_PRODUCTION

    def hash_user(self, user_id: str | None) -> str | None:
        if user_id is None:
            return None
        return hashlib.sha256(self.salt + user_id.encode()).hexdigest()

    async def predict(self, req: PredictionRequest, request_id: str | None) -> bytes:
        """The JSON response body of one prediction (PredictionOut)."""
        tf = req.timeframe.value
        primary, variant = self.select_model(req.symbol, tf, req.user_id)
        models = {t.value: self.models.get(req.symbol, t.value) for t in req.targets}
        models[tf] = primary
        weights = self.weights.lookup(req.symbol, tf)

        versions = ",".join(f"{t}={m.version if m else '-'}" for t, m in models.items())
        for _attempt in range(3):
            epoch = self.series.epoch
            input_id, close = await self._input(req, tf)
            key = (
                f"pred:{CACHE_SCHEMA}:{req.symbol}:{tf}:{primary.version}:"
                f"{_digest(versions, variant, weights.version, input_id)}"
            )
            hit = await self.cache.lookup(key) if req.use_cache else None
            if hit is None:
                break
            # A series' bars changed while this request looked (a Redis round trip): its stamp may be the old
            # one, and nothing computed on old bars is served once the notification is processed. Look again.
            if req.bars is not None or self.series.epoch == epoch:
                return self._serve(hit, req, variant, True, request_id)
        entry, _shared = await self.cache.single_flight(
            key, lambda: self._compute(req, models, weights.version, weights.weights, close, key)
        )
        return self._serve(entry, req, variant, False, request_id)

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
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}; try again later") from None
        if stamp is None:
            raise NotFoundError(f"no {tf} bars stored for {req.symbol}; upload bars or send them in the request")
        # The newest bar and the last change to any bar of the series identify the stored window.
        return f"stored:{stamp.last_ts}:{stamp.updated_at.timestamp()}", stamp.close

    async def _compute(
        self,
        req: PredictionRequest,
        models: dict[str, LoadedModel | None],
        weights_version: str,
        weights: dict[str, float],
        close: float,
        key: str,
    ) -> dict[str, Any]:
        self.computations += 1
        tf = req.timeframe.value
        wanted = [t for t, m in models.items() if m is not None]
        limit = max(m.sequence_length for m in models.values() if m is not None)
        rows = await self._features(req, wanted, limit)

        per_tf: dict[str, dict[str, Any]] = {}
        signals: dict[str, tuple[str, float]] = {}
        primary_out: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], Rows] | None = None
        for t, model in models.items():
            if model is None:
                per_tf[t] = {
                    "status": "no_model",
                    "signal": None,
                    "confidence": None,
                    "model_version": None,
                    "detail": f"no production model for {req.symbol} {t}",
                }
                continue
            got = rows[t]
            if isinstance(got, AppError):
                if t == tf:
                    raise self._not_enough(got, req, t, model) if isinstance(got, ValidationFailed) else got
                per_tf[t] = {
                    "status": "insufficient_data",
                    "signal": None,
                    "confidence": None,
                    "model_version": model.version,
                    "detail": got.message,
                }
                continue
            if len(got) < model.sequence_length:
                err = self._not_enough(None, req, t, model, rows_have=len(got))
                if t == tf:
                    raise err
                per_tf[t] = {
                    "status": "insufficient_data",
                    "signal": None,
                    "confidence": None,
                    "model_version": model.version,
                    "detail": err.message,
                }
                continue
            missing = [n for n in model.feature_names if n not in got.names]
            if missing:
                raise ServiceUnavailable(
                    f"model {model.version} needs features the indicators service does not provide: {missing}"
                )
            window = got.window(model.feature_names, model.sequence_length)
            p = model.predict(window)
            signal, confidence = decide(p.tolist())
            signals[t] = (signal, confidence)
            per_tf[t] = {
                "status": "ok",
                "signal": signal,
                "confidence": round(confidence, 6),
                "model_version": model.version,
                "probabilities": {c: round(float(p[i]), 6) for i, c in enumerate(CLASSES)},
                "bar_ts": got.ts[-1],
            }
            if t == tf:
                primary_out = (p, window, got)
        assert primary_out is not None
        p, window, got = primary_out
        signal, confidence = signals[tf]
        latest = dict(zip(got.names, got.values[-1].tolist(), strict=True))
        w32 = np.ascontiguousarray(window, dtype=np.float32)
        ttl_s = ttl_seconds(req.timeframe, self.settings.cache_ttl_seconds)
        entry = {
            "symbol": req.symbol,
            "timeframe": tf,
            "signal": signal,
            "confidence": round(confidence, 6),
            "probabilities": {c: round(float(p[i]), 6) for i, c in enumerate(CLASSES)},
            "model_version": models[tf].version,  # type: ignore[union-attr]
            "timeframes": per_tf,
            "consensus": consensus(signals),
            "indicator_score": indicator_score(latest, weights),
            "weights_version": weights_version,
            "risk": risk(signal, confidence, close, float(latest.get("atr_14_pct", float("nan"))), self.limits),
            "bar_ts": got.ts[-1],
            "generated_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "window_hash": hashlib.sha256(w32.tobytes() + str(w32.shape).encode()).hexdigest(),
            "window_shape": list(w32.shape),
            "window_b64": base64.b64encode(w32.tobytes()).decode(),
            # Both cache tiers keep the entry until then (the L1 cannot read Redis's TTL back).
            "expires_at": time.time() + ttl_s,
        }
        # A no-cache request still refreshes the entry for the requests after it.
        await self.cache.store(key, entry, ttl_s)
        return entry

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
            f"for model {model.version}'s input window), have {have}"
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
        self, entry: dict[str, Any], req: PredictionRequest, variant: str, cached: bool, request_id: str | None
    ) -> bytes:
        prediction_id = uuid7()
        now = time.time()
        probs = entry["probabilities"]
        self.log.append(
            (
                prediction_id,
                now,
                entry["symbol"],
                entry["timeframe"],
                entry["bar_ts"],
                entry["model_version"],
                variant,
                self.hash_user(req.user_id),
                entry["window_hash"],
                entry["window_b64"],
                entry["window_shape"],
                [probs[c] for c in CLASSES],
                entry["signal"],
                entry["confidence"],
                entry["consensus"]["signal"],
                cached,
                request_id,
            )
        )
        # The response is the entry's fields, the same for every request it serves, plus three per request.
        # Those fields are rendered once per entry (an L1 hit reuses the rendering) and the three spliced in
        # front: rendering the whole response each time cost about a tenth of a cached prediction.
        rendered: bytes | None = entry.get(_RENDERED)
        if rendered is None:
            rendered = orjson.dumps({k: entry[k] for k in _RESPONSE_FIELDS})
            entry[_RENDERED] = rendered
        head = orjson.dumps({"prediction_id": str(prediction_id), "variant": variant, "cached": cached})
        return head[:-1] + b"," + rendered[1:]
