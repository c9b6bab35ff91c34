"""Trainer API: roles, validation and 404 before anything is queued."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from services.trainer.main import create_app
from services.trainer.settings import TrainerSettings
from shared.settings import Settings
from tests.conftest import READ_KEY, asgi_client


@pytest.fixture(scope="module")
def queue(redis_url: str) -> Iterator[str]:
    """A queue nobody consumes (these tests never get as far as a worker), deleted afterwards."""
    import redis

    name = f"trainer-routes-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    client.delete(name)
    client.close()


@pytest.fixture(scope="module")
async def client(trainer_settings: Settings, queue: str) -> AsyncIterator[httpx.AsyncClient]:
    async for c in asgi_client(create_app(trainer_settings, TrainerSettings(queue=queue))):
        yield c


async def _jobs_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM training_jobs"))
    finally:
        await conn.close()


async def test_unknown_series_is_404_and_queues_nothing(client: httpx.AsyncClient, database_url: str) -> None:
    before = await _jobs_count(database_url)
    r = await client.post("/v1/jobs", json={"kind": "train", "symbol": "NOSUCH", "timeframe": "H1"})
    assert r.status_code == 404
    assert r.json()["error"] == "not_found" and "NOSUCH" in r.json()["detail"]
    assert await _jobs_count(database_url) == before


async def test_bad_params_are_422_naming_the_field(client: httpx.AsyncClient, spx_bars: str) -> None:
    r = await client.post(
        "/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "D1", "params": {"epochs": 0}}
    )
    assert r.status_code == 422 and "params.epochs" in r.json()["detail"]
    r = await client.post(
        "/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "D1", "params": {"fault": "exit"}}
    )
    assert r.status_code == 422  # fault injection is off outside test deployments
    r = await client.post("/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "X9"})
    assert r.status_code == 422


async def test_queueing_needs_admin(trainer_settings: Settings, spx_bars: str, queue: str) -> None:
    app = create_app(trainer_settings, TrainerSettings(queue=queue))
    async for reader in asgi_client(app, READ_KEY):
        r = await reader.post("/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "D1"})
        assert r.status_code == 403
        assert (await reader.get("/v1/models")).status_code == 200
    async for anonymous in asgi_client(app, None):
        assert (await anonymous.get("/v1/models")).status_code == 401


async def test_higher_timeframe_is_accepted_through_resampling(client: httpx.AsyncClient, spx_bars: str) -> None:
    # W1 is not stored for SPXTRAIN; it can be built from D1, so the job is accepted.
    r = await client.post("/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "W1"})
    assert r.status_code == 202
    job = await client.get(f"/v1/jobs/{r.json()['job_id']}")
    assert job.status_code == 200 and job.json()["status"] == "queued" and job.json()["progress"] == 0
    assert (await client.get("/v1/jobs/doesnotexist")).status_code == 404


async def test_metrics_report_jobs_of_every_worker_from_the_jobs_table(
    client: httpx.AsyncClient, database_url: str
) -> None:
    app = client._transport.app  # type: ignore[attr-defined]
    await app.state.jobs_metrics.refresh(app.state.pool)
    before = app.state.jobs_metrics.snapshot.counts
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO training_jobs (id, kind, symbol, timeframe, status, started_at, finished_at) VALUES "
            "($1, 'train', 'METRICS', 'H1', 'succeeded', now() - interval '42 seconds', now()), "
            "($2, 'train', 'METRICS', 'H1', 'failed', now() - interval '5 seconds', now())",
            f"m-{secrets.token_hex(4)}",
            f"m-{secrets.token_hex(4)}",
        )
    finally:
        await conn.close()
    await app.state.jobs_metrics.refresh(app.state.pool)
    text = (await client.get("/metrics")).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("ml_training"))
    assert float(lines['ml_training_jobs_total{status="succeeded"}']) == before.get("succeeded", 0) + 1
    assert float(lines['ml_training_jobs_total{status="failed"}']) == before.get("failed", 0) + 1
    # the 42-second job sits above the 30 s bucket and inside the 60 s one
    assert (
        float(lines['ml_training_duration_seconds_bucket{le="60.0"}'])
        - float(lines['ml_training_duration_seconds_bucket{le="30.0"}'])
        >= 1
    )
    assert float(lines["ml_training_duration_seconds_sum"]) >= 42
