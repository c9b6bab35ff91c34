"""Predictor service: real-time signals from production ONNX models, cached, logged, never TensorFlow.

Run: `uvicorn services.predictor.main:app --port 8080`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Request

from services.predictor import repository
from services.predictor.cache import PredictionCache
from services.predictor.deps import predictor_of
from services.predictor.drift import DriftMonitor
from services.predictor.explanations import Explanations
from services.predictor.features_client import IndicatorsClient
from services.predictor.model_manager import ModelManager
from services.predictor.performance import PerformanceGauges
from services.predictor.prediction_log import PredictionLog
from services.predictor.routes import lean, router
from services.predictor.schemas import PredictionIn
from services.predictor.series import SeriesStamps
from services.predictor.service import Predictor
from services.predictor.settings import PredictorSettings
from services.predictor.signals import WeightsBook
from services.predictor.stream_routes import stream_router
from services.predictor.streaming import SignalStreams
from services.predictor.trainer_client import TrainerClient
from services.predictor.webhooks import router as webhooks_router
from services.predictor.webhooks import webhooks_running
from shared.app import add_routes, build_app, periodic
from shared.cache import create_redis
from shared.db import create_pool, require_database_url
from shared.health import ReadinessChecks, check_database
from shared.logging import configure_logging
from shared.storage import open_store

log = logging.getLogger("predictor")


async def _check_cache(request: Request) -> None:
    await predictor_of(request.app).cache.ping()


async def _check_storage(request: Request) -> None:
    await anyio.to_thread.run_sync(predictor_of(request.app).models.store.ping)


async def _check_indicators(request: Request) -> None:
    await predictor_of(request.app).features.health()


async def _check_models_loaded(request: Request) -> None:
    models = predictor_of(request.app).models
    if not models.loaded_once:
        raise RuntimeError(f"the model registry has not been read yet: {models.last_error or 'starting'}")


async def _check_production_models(request: Request) -> None:
    models = predictor_of(request.app).models
    if not models.models:
        raise RuntimeError("no production model loaded: every prediction answers 404")


async def _check_prediction_log(request: Request) -> None:
    plog = predictor_of(request.app).log
    if plog.last_error:
        raise RuntimeError(f"{len(plog.buffer)} records buffered; last write failed: {plog.last_error}")


def create_app(settings: PredictorSettings) -> FastAPI:
    """The predictor app; `settings` are read once per process (below, for uvicorn) and passed down."""
    configure_logging("predictor", settings.log_level)
    # httpx logs every request at INFO: one line per features call is noise and costs throughput.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = app.state.pool = await create_pool(settings, "aicash-predictor")
        store = open_store(settings)
        redis = create_redis(settings, "aicash-predictor")
        features = IndicatorsClient(settings)
        trainer = TrainerClient(settings)
        plog = PredictionLog(
            pool,
            flush_seconds=settings.prediction_log_flush_seconds,
            batch_rows=settings.prediction_log_batch_rows,
            buffer_rows=settings.prediction_log_buffer_rows,
            retention_days=settings.prediction_log_retention_days,
            prune_interval_seconds=settings.prediction_log_prune_interval_seconds,
            remember_hashes=settings.prediction_log_window_hashes,
        )
        series = SeriesStamps(pool, require_database_url(settings), settings.series_poll_seconds)
        weights = WeightsBook()
        models = ModelManager(store, pool, require_database_url(settings), settings.model_poll_seconds)

        async def refresh_weights() -> None:
            weights.replace(await repository.latest_weights(pool))

        app.state.predictor = Predictor(
            settings,
            pool,
            models,
            PredictionCache(redis, settings.cache_cooldown_seconds, settings.cache_l1_entries),
            features,
            plog,
            weights,
            series,
        )
        app.state.explanations = Explanations(pool, plog, trainer)
        streams = app.state.streams = (
            SignalStreams(settings, pool, app.state.predictor, require_database_url(settings))
            if settings.stream_enabled
            else None
        )
        drift = app.state.predictor.drift = DriftMonitor(settings, pool, redis, models)
        gauges = app.state.performance_gauges = PerformanceGauges(pool)
        plog.start()
        await series.start()
        await models.start()
        if streams is not None:
            await streams.start()
        drift.start()
        try:
            await refresh_weights()
        except Exception as exc:  # the periodic refresh below retries; defaults serve meanwhile
            log.warning("cannot read indicator weights; equal weights serve meanwhile", extra={"error": str(exc)})
        log.info("predictor started", extra={"models": len(models.models)})
        try:
            # Weights rows send no notification: a new row is used within MODEL_POLL_SECONDS.
            async with (
                periodic("indicator weights", settings.model_poll_seconds, refresh_weights),
                # ml_model_accuracy and the other live-performance gauges, from settled outcomes.
                periodic("performance gauges", settings.performance_refresh_seconds, gauges.refresh),
                # Every signal the stream computes (once across replicas) is also handed to the webhooks.
                webhooks_running(app, pool, settings, streams.subscribe_internal if streams is not None else None),
            ):
                yield
        finally:
            if streams is not None:
                await streams.stop()
            await drift.stop()
            await models.stop()
            await series.stop()
            await plog.stop()
            await features.aclose()
            await trainer.aclose()
            if redis is not None:
                with contextlib.suppress(Exception):
                    await redis.aclose()
            await pool.close()

    checks = ReadinessChecks()
    checks.add("database", check_database, critical=True)
    checks.add("indicators", _check_indicators, critical=True)
    checks.add("models_loaded", _check_models_loaded, critical=True)
    checks.add("production_models", _check_production_models, critical=False)
    checks.add("cache", _check_cache, critical=False)
    checks.add("model_storage", _check_storage, critical=False)
    checks.add("prediction_log", _check_prediction_log, critical=False)
    app = build_app(
        title="AI Cash Evolution — predictor",
        description="Trading signals with calibrated confidence from production ONNX models, multi-timeframe "
        "consensus, indicator score and risk limits. Authenticate with `X-API-Key` (roles read < write < admin).",
        settings=settings,
        lifespan=lifespan,
        checks=checks,
        extra_schemas=[PredictionIn],
    )
    add_routes(app, lean, router, stream_router, webhooks_router)
    return app


app = create_app(PredictorSettings())
