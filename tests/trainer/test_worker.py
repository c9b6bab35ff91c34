"""A real Celery worker process on a Redis queue of this run: jobs through the API, killed workers,
crashing jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from services.trainer import repository as repo
from services.trainer.main import create_app
from services.trainer.schemas import Job
from services.trainer.settings import TrainerSettings
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.conftest import asgi_client
from tests.trainer.conftest import TINY, Worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def api(
    trainer_settings: Settings, worker_env: dict[str, str], worker: Worker
) -> AsyncIterator[httpx.AsyncClient]:
    tsettings = TrainerSettings(queue=worker_env["TRAINER_QUEUE"], fault_injection=True)
    async for client in asgi_client(create_app(trainer_settings, tsettings)):
        yield client


async def _job(database_url: str, job_id: str) -> Job:
    conn = await asyncpg.connect(database_url)
    try:
        job = await repo.get_job(conn, job_id)
    finally:
        await conn.close()
    assert job is not None
    return job


async def _wait(database_url: str, job_id: str, until: Any, timeout_s: float = 240.0) -> Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = await _job(database_url, job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} did not reach the expected state in {timeout_s:.0f} s: {job}")
        await asyncio.sleep(0.5)


def _done(job: Job) -> bool:
    return job.status in ("succeeded", "failed")


async def _submit(api: httpx.AsyncClient, params: dict[str, Any]) -> str:
    r = await api.post("/v1/jobs", json={"kind": "train", "symbol": "SPXTRAIN", "timeframe": "D1", "params": params})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


async def test_crashing_worker_process_ends_failed_after_bounded_attempts(
    api: httpx.AsyncClient, database_url: str, spx_bars: str
) -> None:
    # The pool process exits hard on every attempt, as on a segfault or an out-of-memory kill.
    job_id = await _submit(api, {**TINY, "fault": "exit"})
    job = await _wait(database_url, job_id, _done)
    assert job.status == "failed"
    assert job.attempts == 3
    assert job.error is not None and "gave up after 3 attempts" in job.error
    r = await api.get(f"/v1/jobs/{job_id}")
    assert r.json()["status"] == "failed" and "gave up" in r.json()["error"]


async def test_job_raising_every_time_ends_failed_with_its_error(
    api: httpx.AsyncClient, database_url: str, spx_bars: str
) -> None:
    job_id = await _submit(api, {**TINY, "fault": "raise"})
    job = await _wait(database_url, job_id, _done)
    assert job.status == "failed"
    assert job.attempts == 3
    assert job.error == "failed after 3 attempts: RuntimeError: injected fault"


async def test_sigkilled_worker_job_completes_exactly_once(
    api: httpx.AsyncClient, database_url: str, worker: Worker, s3_store: ObjectStore, spx_bars: str
) -> None:
    params = {**TINY, "epochs": 8, "patience": 8}
    job_id = await _submit(api, params)
    # Mid-training: running, at least one epoch reported.
    await _wait(database_url, job_id, lambda j: j.status == "running" and len(j.history) >= 1)
    live = [p for p in worker.procs if p.poll() is None]
    assert live, "no live worker"
    for p in live:
        worker.kill(p)
    assert (await _job(database_url, job_id)).status == "running"  # nobody will tell PostgreSQL otherwise
    worker.start()

    job = await _wait(database_url, job_id, _done)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert [h.epoch for h in job.history][0] == 1  # the second attempt's own history, from epoch 1

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version FROM model_versions WHERE training_job_id = $1", job_id)
    finally:
        await conn.close()
    assert len(rows) == 1
    assert job.result is not None and job.result["version"] == rows[0]["version"]
    versions = {k.split("/")[2] for k in s3_store.list("SPXTRAIN/D1/") if k.split("/")[2].endswith(job_id[:6])}
    assert versions == {rows[0]["version"]}

    r = await api.get("/v1/models", params={"symbol": "SPXTRAIN", "timeframe": "D1"})
    assert r.status_code == 200
    assert rows[0]["version"] in [m["version"] for m in r.json()]
