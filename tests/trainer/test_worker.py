"""A real Celery worker process on a Redis queue of this run: jobs through the API, killed workers,
crashing jobs, PostgreSQL going away under the worker, lost messages recovered by the sweeper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from services.trainer import repository as repo
from services.trainer.main import create_app
from services.trainer.settings import TrainerSettings
from shared.storage import ObjectStore
from tests.support.celery import Worker
from tests.support.clients import asgi_client
from tests.support.trainer import TINY, TcpProxy, fetch_job, job_done, new_job, submit_train, versions_of, wait_for_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def api(
    trainer_settings: TrainerSettings, worker_env: dict[str, str], worker: Worker
) -> AsyncIterator[httpx.AsyncClient]:
    settings = trainer_settings.model_copy(
        update={"trainer_queue": worker_env["TRAINER_QUEUE"], "trainer_fault_injection": True}
    )
    async for client in asgi_client(create_app(settings)):
        yield client


@pytest.mark.faults
async def test_crashing_worker_process_ends_failed_after_bounded_attempts(
    api: httpx.AsyncClient, database_url: str, spx_bars: str
) -> None:
    # The pool process exits hard on every attempt, as on a segfault or an out-of-memory kill.
    job_id = await submit_train(api, {**TINY, "fault": "exit"})
    job = await wait_for_job(database_url, job_id, job_done, poll_s=0.5)
    assert job.status == "failed"
    assert job.attempts == 3
    assert job.error is not None and "gave up after 3 attempts" in job.error
    r = await api.get(f"/v1/jobs/{job_id}")
    assert r.json()["status"] == "failed" and "gave up" in r.json()["error"]


@pytest.mark.faults
async def test_job_raising_every_time_ends_failed_with_its_error(
    api: httpx.AsyncClient, database_url: str, spx_bars: str
) -> None:
    job_id = await submit_train(api, {**TINY, "fault": "raise"})
    job = await wait_for_job(database_url, job_id, job_done, poll_s=0.5)
    assert job.status == "failed"
    assert job.attempts == 3
    assert job.error == "failed after 3 attempts: RuntimeError: injected fault"


@pytest.mark.faults
async def test_sigkilled_worker_job_completes_exactly_once(
    api: httpx.AsyncClient, database_url: str, worker: Worker, s3_store: ObjectStore, spx_bars: str
) -> None:
    params = {**TINY, "epochs": 8, "patience": 8}
    job_id = await submit_train(api, params)
    # Mid-training: running, at least one epoch reported.
    await wait_for_job(database_url, job_id, lambda j: j.status == "running" and len(j.history) >= 1, poll_s=0.5)
    live = [p for p in worker.procs if p.poll() is None]
    assert live, "no live worker"
    for p in live:
        worker.kill(p)
    assert (await fetch_job(database_url, job_id)).status == "running"  # nobody will tell PostgreSQL otherwise
    worker.start()

    job = await wait_for_job(database_url, job_id, job_done, poll_s=0.5)
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
    versions = {k.split("/")[2] for k in s3_store.list("SPXTRAIN/D1/") if k.split("/")[2].endswith("-" + job_id)}
    assert versions == {rows[0]["version"]}

    r = await api.get("/v1/models", params={"symbol": "SPXTRAIN", "timeframe": "D1"})
    assert r.status_code == 200
    assert rows[0]["version"] in [m["version"] for m in r.json()]


async def test_database_down_when_the_worker_picks_the_job_is_retried_not_lost(
    api: httpx.AsyncClient, database_url: str, pg_proxy: TcpProxy, spx_bars: str
) -> None:
    pg_proxy.down()  # the worker cannot reach PostgreSQL (the API can)
    try:
        job_id = await submit_train(api, TINY)
        await asyncio.sleep(4)  # several deliveries fail to connect and are retried with backoff
        job = await fetch_job(database_url, job_id)
        assert job.status == "queued" and job.attempts == 0
    finally:
        pg_proxy.up()
    job = await wait_for_job(database_url, job_id, job_done, poll_s=0.5)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1  # deliveries that could not reach PostgreSQL started no attempt
    assert len(await versions_of(database_url, job_id)) == 1


async def test_database_lost_during_training_is_retried_and_the_job_completes_once(
    api: httpx.AsyncClient, database_url: str, pg_proxy: TcpProxy, s3_store: ObjectStore, spx_bars: str
) -> None:
    job_id = await submit_train(api, {**TINY, "epochs": 10, "patience": 10})
    await wait_for_job(database_url, job_id, lambda j: j.status == "running" and len(j.history) >= 1, poll_s=0.5)
    pg_proxy.down()  # drops the worker's connection mid-training: the next epoch's progress write fails
    try:
        await asyncio.sleep(4)
        job = await fetch_job(database_url, job_id)
        assert job.status == "running" and job.attempts == 1  # nobody could record anything meanwhile
    finally:
        pg_proxy.up()
    job = await wait_for_job(database_url, job_id, job_done, poll_s=0.5)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2  # the interrupted attempt counts, once
    assert [h.epoch for h in job.history][0] == 1
    versions = await versions_of(database_url, job_id)
    assert len(versions) == 1
    folders = {k.split("/")[2] for k in s3_store.list("SPXTRAIN/D1/") if k.split("/")[2].endswith("-" + job_id)}
    assert folders == set(versions)


async def test_sweeper_resends_an_orphaned_job_which_completes_exactly_once(
    trainer_settings: TrainerSettings, database_url: str, worker_env: dict[str, str], worker: Worker, spx_bars: str
) -> None:
    from services.trainer import publisher as pub
    from services.trainer.celery_app import create_celery
    from services.trainer.sweeper import run_sweep

    settings = trainer_settings.model_copy(
        update={"trainer_queue": worker_env["TRAINER_QUEUE"], "trainer_sweep_stale_after_seconds": 600}
    )
    publisher = create_celery(settings)
    sent: list[str] = []

    def send(kind: str, job_id: str) -> None:
        sent.append(job_id)
        pub.send_job(publisher, kind, job_id, settings.trainer_queue)

    # A job row whose message was lost (never sent), untouched for an hour; and a "running" job as old
    # whose lock a live process holds (slow, not lost): only the first is re-sent.
    conn = await asyncpg.connect(database_url)
    # Jobs that earlier modules queued to queues nobody consumes (the fault and contract suites' trainer apps)
    # are stale by now: the sweeper would rightly re-send them too. They are not this test's.
    await conn.execute(
        "UPDATE training_jobs SET status = 'failed', error = 'test: left queued by an earlier test module' "
        "WHERE status IN ('queued', 'running')"
    )
    orphan = await new_job(database_url, "SPXTRAIN", "D1", TINY)
    busy = await new_job(database_url, "SPXTRAIN", "M1", {})
    holder = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE training_jobs SET updated_at = now() - interval '1 hour' WHERE id = ANY($1::text[])", [orphan, busy]
        )
        await conn.execute("UPDATE training_jobs SET status = 'running' WHERE id = $1", busy)
        assert await repo.try_lock_job(holder, busy)

        first = await asyncio.to_thread(run_sweep, send, settings)
        assert first["resent"] == [orphan] and sent == [orphan]
        again = await asyncio.to_thread(run_sweep, send, settings)
        assert again["resent"] == []  # claimed rows wait another stale period before a second send

        job = await wait_for_job(database_url, orphan, job_done, poll_s=0.5)
        assert job.status == "succeeded", job.error
        assert job.attempts == 1
        assert len(await versions_of(database_url, orphan)) == 1
        await conn.execute("UPDATE training_jobs SET updated_at = now() - interval '1 hour' WHERE id = $1", orphan)
        assert (await asyncio.to_thread(run_sweep, send, settings))["resent"] == []
        assert sent == [orphan]
    finally:
        await repo.fail_job(conn, busy, "test: done")
        if not job_done(await fetch_job(database_url, orphan)):  # a failed assertion must not block the series
            await repo.fail_job(conn, orphan, "test: abandoned")
        await holder.close()
        await conn.close()
        publisher.close()
