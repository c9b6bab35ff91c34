"""Trainer fixtures: a real S3-compatible server (seaweedfs), real bars in the test database, a real
Celery worker process on a Redis queue of this run's own."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from services.trainer.jobs import run_job
from services.trainer.settings import TrainerSettings
from shared.storage import ObjectStore, store_from_url
from shared.timeframes import OHLCV, Timeframe
from tests.support import REPO
from tests.support.keys import API_KEYS
from tests.support.net import free_ports
from tests.support.trainer import (
    BUCKET,
    SYMBOL,
    TINY,
    WEED_GRPC_OFFSET,
    TcpProxy,
    Worker,
    ingest,
    new_job,
    via_proxy,
    weed_binary,
)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real seaweedfs server with its S3 gateway, killed at the end of the run."""
    import boto3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "aicash-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "aicash-test-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    data = tmp_path_factory.mktemp("weed")
    master, volume, filer, s3 = free_ports(4, also_free_at=WEED_GRPC_OFFSET)
    log = (data / "weed.log").open("wb")
    proc = subprocess.Popen(
        [
            weed_binary(),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{s3}"
    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"seaweedfs did not start; see {data / 'weed.log'}")
            time.sleep(0.5)
    yield endpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


@pytest.fixture(scope="session")
def store_url() -> str:
    return f"s3://{BUCKET}/run-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def s3_store(s3_endpoint: str, store_url: str) -> ObjectStore:
    return store_from_url(store_url, s3_endpoint)


@pytest.fixture(scope="session")
def trainer_settings(database_url: str, s3_endpoint: str, store_url: str, redis_url: str) -> TrainerSettings:
    return TrainerSettings(  # type: ignore[arg-type]
        database_url=database_url,
        redis_url=redis_url,
        model_store_url=store_url,
        s3_endpoint_url=s3_endpoint,
        api_keys=API_KEYS,
        environment="test",
    )


@pytest.fixture(scope="session")
async def spx_bars(database_url: str, sp500: OHLCV) -> str:
    """Real S&P 500 daily bars (5031) stored as SPXTRAIN D1."""
    await ingest(database_url, SYMBOL, Timeframe.D1, sp500)
    return SYMBOL


@pytest.fixture(scope="session")
def pg_proxy(database_url: str) -> Iterator[TcpProxy]:
    u = urlsplit(database_url)
    proxy = TcpProxy(u.hostname or "127.0.0.1", u.port or 5432)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def worker_env(
    trainer_settings: TrainerSettings, tmp_path_factory: pytest.TempPathFactory, pg_proxy: TcpProxy
) -> dict[str, str]:
    assert trainer_settings.database_url and trainer_settings.redis_url and trainer_settings.s3_endpoint_url
    return {
        **os.environ,
        # The worker reaches PostgreSQL through a proxy the tests can cut (the API and the tests do not).
        "DATABASE_URL": via_proxy(trainer_settings.database_url, pg_proxy),
        "CELERY_BROKER_URL": trainer_settings.redis_url,
        "MODEL_STORE_URL": trainer_settings.model_store_url,
        "S3_ENDPOINT_URL": trainer_settings.s3_endpoint_url,
        "TRAINER_QUEUE": f"trainer-test-{os.getpid()}-{secrets.token_hex(3)}",
        "TRAINER_FAULT_INJECTION": "true",
        # The jobs these tests count are training jobs: no validation follows (tests/trainer/test_quality_jobs.py).
        "TRAINER_VALIDATE_AFTER_TRAIN": "false",
        "TRAINER_RETRY_DELAY_SECONDS": "1",
        # PostgreSQL unreachable: retry the delivery every second or so, for as long as a test keeps it down.
        "TRAINER_DB_RETRY_BASE_SECONDS": "0.5",
        "TRAINER_DB_RETRY_MAX_DELAY_SECONDS": "1",
        "TRAINER_DB_RETRY_MAX": "100",
        # Redelivery of a dead worker's message within seconds (production: hours, above the longest job).
        "TRAINER_VISIBILITY_TIMEOUT_SECONDS": "15",
        "TRAINER_UNACKED_RESTORE_INTERVAL_SECONDS": "2",
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(env=worker_env, log_path=tmp_path_factory.mktemp("worker") / "worker.log")
    w.start()
    yield w
    w.stop_all()


@pytest.fixture(scope="session")
async def trained(spx_bars: str, trainer_settings: TrainerSettings) -> dict[str, Any]:
    assert trainer_settings.database_url
    job_id = await new_job(trainer_settings.database_url, spx_bars, "D1", TINY)
    result = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)
    return {"job_id": job_id, "result": result}
