"""Indicators service: stores bars and computes the 17 features on any timeframe, without look-ahead.

Run: `uvicorn services.indicators.main:app --port 8081`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from fastapi import FastAPI

from services.indicators.metrics import StalenessCollector
from services.indicators.routes import router
from services.indicators.schemas import IndicatorsIn
from shared.app import add_routes, build_app, periodic
from shared.bars import BarsIn
from shared.db import create_pool
from shared.health import ReadinessChecks, check_database
from shared.logging import configure_logging
from shared.market_repository import list_series
from shared.settings import Settings, get_settings

log = logging.getLogger("indicators")

# How often each worker refreshes its snapshot of the series table for the staleness gauge.
STALENESS_REFRESH_SECONDS = 15.0


def create_app(settings: Settings) -> FastAPI:
    configure_logging("indicators", settings.log_level)
    staleness = StalenessCollector()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(settings, "aicash-indicators")
        try:
            await app.state.pool.fetchval("SELECT 1")
        except (OSError, asyncpg.PostgresError):
            log.warning("PostgreSQL unreachable at start; /health/ready reports unhealthy until it is back")

        async def refresh() -> None:
            staleness.replace(await list_series(app.state.pool))

        try:
            async with periodic("series for the staleness gauge", STALENESS_REFRESH_SECONDS, refresh):
                log.info("indicators service started")
                yield
        finally:
            await app.state.pool.close()

    checks = ReadinessChecks()
    checks.add("database", check_database, critical=True)
    app = build_app(
        title="AI Cash Evolution — indicators",
        description="Market bars in, 17 scale-free technical indicator features out, on any timeframe, "
        "without look-ahead. Authenticate with `X-API-Key` (roles read < write < admin).",
        settings=settings,
        lifespan=lifespan,
        checks=checks,
        collectors=[staleness],
        extra_schemas=[BarsIn, IndicatorsIn],
    )
    app.state.staleness = staleness
    add_routes(app, router)
    return app


# uvicorn's entry point reads the process's settings once.
app = create_app(get_settings())
