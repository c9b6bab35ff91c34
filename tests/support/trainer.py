"""Constants and plain helpers of the trainer tests (the fixtures are in tests/trainer/conftest.py):
bars into the database, job rows, a TCP proxy in front of PostgreSQL (the worker process: tests/support/celery.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import numpy as np

from services.trainer import repository as repo
from services.trainer.schemas import Job
from shared.market_repository import upsert_bars
from shared.timeframes import OHLCV, Timeframe

SYMBOL = "SPXTRAIN"
# Small enough that the whole folder runs in a few minutes on 2 cores; big enough to learn something.
TINY = {"lstm_units": [8, 8], "epochs": 2, "batch_size": 128, "patience": 2}
BUCKET = "aicash-models"


async def ingest(database_url: str, symbol: str, timeframe: Timeframe, bars: OHLCV) -> None:
    """Store `bars` as symbol/timeframe in the test database, as the indicators service would."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await upsert_bars(conn, symbol, timeframe, bars, np.zeros(len(bars), dtype=np.int16))
    finally:
        await conn.close()


async def new_job(database_url: str, symbol: str, timeframe: str, params: dict[str, Any]) -> str:
    """A new training job row; nothing is sent to the queue (the test runs or enqueues it). Returns its id."""
    job_id = uuid.uuid4().hex
    conn = await asyncpg.connect(database_url)
    try:
        await repo.create_job(conn, job_id, "train", symbol, timeframe, params)
    finally:
        await conn.close()
    return job_id


class TcpProxy:
    """A loopback TCP forwarder in front of PostgreSQL that a test can take down and bring back.

    `down()` cuts every forwarded connection (as a PostgreSQL restart or a network drop does: the server
    session ends, its advisory locks go with it) and turns new connections away until `up()`.
    """

    def __init__(self, database_url: str) -> None:
        # The server's address: TCP host and port, or the Unix socket that a `?host=/dir` URL names (the embedded
        # PostgreSQL of a machine with no DATABASE_URL listens only there).
        u = urlsplit(database_url)
        port = u.port or 5432
        socket_dir = next((v for k, v in parse_qsl(u.query) if k == "host" and v.startswith("/")), None)
        self.target: tuple[str, int] | str = (
            f"{socket_dir}/.s.PGSQL.{port}" if socket_dir else (u.hostname or "127.0.0.1", port)
        )
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
                upstream = _connect(self.target)
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


def _connect(target: tuple[str, int] | str) -> socket.socket:
    if isinstance(target, tuple):
        return socket.create_connection(target, timeout=5)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def via_proxy(database_url: str, proxy: TcpProxy) -> str:
    """`database_url` with its host and port replaced by the proxy's (and a Unix-socket `host` dropped)."""
    u = urlsplit(database_url)
    netloc = (u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else "") + f"127.0.0.1:{proxy.port}"
    query = urlencode([(k, v) for k, v in parse_qsl(u.query) if k != "host"])
    return urlunsplit(u._replace(netloc=netloc, query=query))


async def fetch_job(database_url: str, job_id: str) -> Job:
    """The job's row as the API reports it (asserts it exists)."""
    conn = await asyncpg.connect(database_url)
    try:
        job = await repo.get_job(conn, job_id)
    finally:
        await conn.close()
    assert job is not None
    return job


async def wait_for_job(
    database_url: str, job_id: str, until: Callable[[Job], bool], timeout_s: float = 300.0, poll_s: float = 0.2
) -> Job:
    """Poll the job's row until `until(job)`; fails the test after `timeout_s`."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        job = await fetch_job(database_url, job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} did not reach the expected state in {timeout_s:.0f} s: {job}")
        await asyncio.sleep(poll_s)


def job_done(job: Job) -> bool:
    return job.status in ("succeeded", "failed")


async def submit_train(api: httpx.AsyncClient, params: dict[str, Any], symbol: str = "SPXTRAIN") -> str:
    """POST /v1/jobs for a D1 training job of `symbol`; returns its id (asserts 202)."""
    r = await api.post("/v1/jobs", json={"kind": "train", "symbol": symbol, "timeframe": "D1", "params": params})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


async def versions_of(database_url: str, job_id: str) -> list[str]:
    """The registry's versions made by the job (exactly-once checks)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version FROM model_versions WHERE training_job_id = $1", job_id)
    finally:
        await conn.close()
    return [r["version"] for r in rows]
