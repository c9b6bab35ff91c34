"""The three services' apps in-process for the hostile-input fault cases (tests/faults): auth matrix, body limits,
hostile bars, injection. A plain module; the fault tests' fixtures call `three_apps`.

Every app runs its real lifespan on the test run's PostgreSQL and Redis (no mock of either); the predictor gets an
empty file model store and an indicators URL nobody listens on, which is enough for every route to authenticate,
validate and answer (a prediction then says 503 or 404, never 500).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio
from fastapi import FastAPI

from services.indicators.main import create_app as indicators_app
from services.predictor.main import create_app as predictor_app
from services.trainer.main import create_app as trainer_app
from services.trainer.settings import TrainerSettings
from shared.settings import Settings
from tests.support.keys import ADMIN_KEY, API_KEYS, READ_KEY, WRITE_KEY
from tests.support.net import free_port
from tests.support.predictor import predictor_settings

KEYS = {"read": READ_KEY, "write": WRITE_KEY, "admin": ADMIN_KEY}
ROLES = ("read", "write", "admin")
# Routes anyone may call: health for orchestrators, metrics for Prometheus (nginx and the network policies keep
# them off the public edge), the API's own description, and the indicators' catalog (the feature definitions).
PUBLIC = {
    ("GET", "/health"),
    ("GET", "/health/ready"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/indicators/catalog"),
}


@dataclass
class Service:
    name: str
    app: FastAPI
    client: httpx.AsyncClient  # sends no key: each test sets X-API-Key per request


@contextlib.asynccontextmanager
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


@contextlib.asynccontextmanager
async def three_apps(
    database_url: str, redis_url: str, store_dir: Path, indicators_url: str | None = None, **predictor_extra: object
) -> AsyncIterator[dict[str, Service]]:
    """indicators, trainer and predictor apps with their lifespans running, keyed by name. The trainer publishes
    its jobs to a Redis queue of its own that nobody consumes, deleted at the end. The predictor asks
    `indicators_url` for features (default: a port nobody listens on)."""
    trainer_queue = f"faults-{os.getpid()}-{secrets.token_hex(3)}"
    apps = {
        "indicators": indicators_app(
            Settings(database_url=database_url, api_keys=API_KEYS, environment="test")  # type: ignore[arg-type]
        ),
        "trainer": trainer_app(
            TrainerSettings(
                database_url=database_url,
                redis_url=redis_url,
                api_keys=API_KEYS,
                environment="test",
                trainer_queue=trainer_queue,
            )
        ),
        "predictor": predictor_app(
            predictor_settings(
                database_url,
                redis_url,
                indicators_url or f"http://127.0.0.1:{free_port()}",
                f"file://{store_dir}",
                trainer_url=f"http://127.0.0.1:{free_port()}",
                **predictor_extra,
            )
        ),
    }
    async with contextlib.AsyncExitStack() as stack:
        out: dict[str, Service] = {}
        for name, app in apps.items():
            out[name] = Service(name, app, await stack.enter_async_context(_client(app)))
        try:
            yield out
        finally:
            client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2)
            await client.delete(trainer_queue)
            await client.aclose()


# --- the OpenAPI side of the auth matrix ------------------------------------------------------------------------

METHODS = ("get", "put", "post", "delete", "patch")


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation object) of every operation in an OpenAPI document."""
    for path, item in schema["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def concrete_path(path: str) -> str:
    """The path template with each parameter filled by a value its route accepts as a string (a symbol, a
    timeframe, an id): auth is checked before any of them is looked up."""
    fill = {"timeframe": "H1", "symbol": "AUTHX", "prediction_id": "00000000-0000-0000-0000-000000000000"}
    return re.sub(r"\{(\w+)\}", lambda m: fill.get(m.group(1), "1"), path)


async def row_count(database_url: str, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def retire(database_url: str, *symbols: str) -> None:
    """Archive the models a fault module registered and delete its webhooks, so the predictors of later test
    modules in the same run (same database) neither load them nor deliver to them."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE model_versions SET status = 'archived' WHERE symbol = ANY($1::text[]) AND status <> 'archived'",
            list(symbols),
        )
        await conn.execute(
            "DELETE FROM webhooks WHERE EXISTS (SELECT 1 FROM unnest(series) s WHERE split_part(s, ':', 1) = ANY($1))",
            list(symbols),
        )
    finally:
        await conn.close()
