"""Trainer API: queue training jobs, follow their progress, list the model registry.

Run: `uvicorn services.trainer.main:app --port 8082`. Training itself runs in the Celery worker
(`celery -A services.trainer.worker worker -Q training`); this process never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.trainer.metrics import TrainingJobsCollector
from services.trainer.routes import router
from services.trainer.settings import TrainerSettings, get_trainer_settings
from services.trainer.worker import create_celery
from shared.app import add_routes, build_app, periodic
from shared.db import create_pool
from shared.health import ReadinessChecks, check_database
from shared.logging import configure_logging
from shared.settings import Settings, get_settings

log = logging.getLogger("trainer")


# How often the API re-reads the jobs table for ml_training_jobs_total / ml_training_duration_seconds.
METRICS_REFRESH_SECONDS = 15.0


def create_app(settings: Settings | None = None, trainer_settings: TrainerSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    tsettings = trainer_settings or get_trainer_settings()
    configure_logging("trainer", settings.log_level)

    jobs_metrics = TrainingJobsCollector()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(settings, "aicash-trainer-api")
        # This process's own publisher (broker from its settings, socket timeouts): connects on first send.
        app.state.celery = create_celery(settings, tsettings)
        try:
            async with periodic(
                "training metrics", METRICS_REFRESH_SECONDS, lambda: jobs_metrics.refresh(app.state.pool)
            ):
                log.info("trainer API started")
                yield
        finally:
            app.state.celery.close()
            await app.state.pool.close()

    checks = ReadinessChecks()
    checks.add("database", check_database, critical=True)
    app = build_app(
        title="AI Cash Evolution — trainer",
        description="Queue LSTM training jobs, follow their progress, list the versioned model registry. "
        "Authenticate with `X-API-Key` (roles read < write < admin; queueing needs admin).",
        settings=settings,
        lifespan=lifespan,
        checks=checks,
        collectors=[jobs_metrics],
    )
    app.state.jobs_metrics = jobs_metrics
    app.state.trainer_settings = tsettings
    add_routes(app, router)
    return app


app = create_app()
