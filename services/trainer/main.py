"""Trainer API: queue training, validation, backtest and weights jobs, follow them, the model registry with
each version's gate verdict, validation reports, backtests, explanations.

Run: `uvicorn services.trainer.main:app --port 8082`. The jobs run in the Celery worker
(`celery -A services.trainer.celery_app worker -Q training`); this process never imports TensorFlow, the job
runner or the task module (it sends tasks by name: services.trainer.publisher).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.trainer.celery_app import create_celery
from services.trainer.metrics import TrainingJobsCollector
from services.trainer.routes import router
from services.trainer.settings import TrainerSettings, get_trainer_settings
from services.trainer.ui import create_console
from shared.app import add_routes, build_app, periodic
from shared.db import create_pool
from shared.health import ReadinessChecks, check_database
from shared.logging import configure_logging

log = logging.getLogger("trainer")


# How often the API re-reads the jobs table for ml_training_jobs_total / ml_training_duration_seconds.
METRICS_REFRESH_SECONDS = 15.0


def create_app(settings: TrainerSettings) -> FastAPI:
    """The trainer API over one process's settings (shared and trainer knobs in one object)."""
    configure_logging("trainer", settings.log_level)

    jobs_metrics = TrainingJobsCollector()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(settings, "aicash-trainer-api")
        # This process's own publisher (broker from its settings, socket timeouts): connects on first send.
        app.state.celery = create_celery(settings)
        try:
            async with (
                periodic("training metrics", METRICS_REFRESH_SECONDS, lambda: jobs_metrics.refresh(app.state.pool)),
                console.state.console.running(),
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
        description="Queue LSTM training, walk-forward validation, backtest and indicator-weight jobs, follow "
        "them, read the versioned model registry with each version's promotion-gate verdict, validation report and "
        "business targets. Authenticate with `X-API-Key` (roles read < write < admin; queueing jobs needs admin).",
        settings=settings,
        lifespan=lifespan,
        checks=checks,
        collectors=[jobs_metrics],
    )
    app.state.jobs_metrics = jobs_metrics
    add_routes(app, router)
    # The operator console (services/trainer/ui.py): HTML pages over the APIs, signed in with an API key.
    console = create_console(app, settings)
    app.mount("/ui", console)
    return app


# uvicorn's entry point reads the process's settings once.
app = create_app(get_trainer_settings())
