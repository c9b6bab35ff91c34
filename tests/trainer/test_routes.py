"""Trainer API: roles, validation, 404 and 409 before anything is queued, 503 on a silent broker."""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from services.trainer import repository as repo
from services.trainer.main import create_app
from services.trainer.settings import TrainerSettings
from tests.support.clients import asgi_client
from tests.support.keys import READ_KEY


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
async def client(trainer_settings: TrainerSettings, queue: str) -> AsyncIterator[httpx.AsyncClient]:
    async for c in asgi_client(create_app(trainer_settings.model_copy(update={"trainer_queue": queue}))):
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


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"lstm_units": [0]}, "params.lstm_units.0"),
        ({"lstm_units": [8, 100_000]}, "params.lstm_units.1"),
        ({"lstm_units": [8, 8, 8, 8, 8]}, "params.lstm_units"),
        ({"lstm_units": []}, "params.lstm_units"),
        ({"val_fraction": 0.001}, "params.val_fraction"),
        ({"test_fraction": 0.0}, "params.test_fraction"),
        ({"seed": -1}, "params.seed"),
        ({"batch_size": 10**7}, "params.batch_size"),
        ({"sequence_length": 5000}, "params.sequence_length"),
        ({"patience": 10**6}, "params.patience"),
        ({"learning_rate": 0.0}, "params.learning_rate"),
        ({"dropout": 0.99}, "params.dropout"),
        ({"dropout": math.nan}, "params.dropout"),
        ({"min_sequences": 10**9}, "params.min_sequences"),
    ],
)
async def test_out_of_bounds_params_are_422_before_anything_is_queued(
    client: httpx.AsyncClient, spx_bars: str, database_url: str, params: dict[str, object], field: str
) -> None:
    before = await _jobs_count(database_url)
    r = await client.post(
        "/v1/jobs",
        content=json.dumps({"kind": "train", "symbol": spx_bars, "timeframe": "D1", "params": params}),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]
    assert await _jobs_count(database_url) == before


async def test_queueing_needs_admin(trainer_settings: TrainerSettings, spx_bars: str, queue: str) -> None:
    app = create_app(trainer_settings.model_copy(update={"trainer_queue": queue}))
    async for reader in asgi_client(app, READ_KEY):
        r = await reader.post("/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "D1"})
        assert r.status_code == 403
        assert (await reader.get("/v1/models")).status_code == 200
    async for anonymous in asgi_client(app, None):
        assert (await anonymous.get("/v1/models")).status_code == 401


async def test_higher_timeframe_is_accepted_through_resampling_and_a_second_job_is_409(
    client: httpx.AsyncClient, spx_bars: str, database_url: str
) -> None:
    # W1 is not stored for SPXTRAIN; it can be built from D1, so the job is accepted.
    r = await client.post("/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "W1"})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    try:
        job = await client.get(f"/v1/jobs/{job_id}")
        assert job.status_code == 200 and job.json()["status"] == "queued" and job.json()["progress"] == 0
        assert (await client.get("/v1/jobs/doesnotexist")).status_code == 404

        # One queued or running job per series: a second request is refused and names the first.
        before = await _jobs_count(database_url)
        again = await client.post("/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "W1"})
        assert again.status_code == 409
        assert again.json()["error"] == "job_in_progress"
        assert job_id in again.json()["detail"] and "already queued or running" in again.json()["detail"]
        assert await _jobs_count(database_url) == before
        assert "409" in (await client.get("/openapi.json")).json()["paths"]["/v1/jobs"]["post"]["responses"]
    finally:
        conn = await asyncpg.connect(database_url)
        try:
            await repo.fail_job(conn, job_id, "test: nobody consumes this queue")
        finally:
            await conn.close()


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


@pytest.fixture
async def silent_broker() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never sends a byte (a hung broker or a black-holing LB)."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for w in writers:
        w.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("scheme", "limits"),
    [
        ("redis", {}),  # the defaults: socket timeouts answer first
        ("amqp", {}),
        ("redis", {"broker_timeout_seconds": 30.0, "publish_timeout_seconds": 1.0}),  # the hard bound alone
    ],
)
async def test_silent_broker_is_503_within_seconds_and_the_job_is_failed(
    trainer_settings: TrainerSettings,
    spx_bars: str,
    database_url: str,
    silent_broker: int,
    queue: str,
    scheme: str,
    limits: dict[str, float],
) -> None:
    url = (
        f"redis://127.0.0.1:{silent_broker}/0"
        if scheme == "redis"
        else f"amqp://guest:guest@127.0.0.1:{silent_broker}//"
    )
    settings = trainer_settings.model_copy(update={"celery_broker_url": url, "trainer_queue": queue, **limits})
    app = create_app(settings)
    async for c in asgi_client(app):
        start = time.monotonic()
        r = await asyncio.wait_for(
            c.post("/v1/jobs", json={"kind": "train", "symbol": spx_bars, "timeframe": "D1"}), timeout=30
        )
        elapsed = time.monotonic() - start
        assert r.status_code == 503, r.text
        assert elapsed < settings.trainer_publish_timeout_seconds + 1.5
        body = r.json()
        assert body["error"] == "service_unavailable" and "broker is unavailable" in body["detail"]
        found = re.search(r"job ([0-9a-f]{32}) was marked failed", body["detail"])
        assert found, body["detail"]
        conn = await asyncpg.connect(database_url)
        try:
            job = await repo.get_job(conn, found.group(1))
        finally:
            await conn.close()
        assert job is not None and job.status == "failed"
        assert job.error is not None and job.error.startswith("could not queue the job")
