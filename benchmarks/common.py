"""Helpers for benchmark scripts: a temporary database, service subprocesses, latency statistics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def temporary_database() -> Iterator[str]:
    """A fresh, migrated database on DATABASE_URL's server (or an embedded one), dropped afterwards."""
    from shared.migrate import upgrade

    server = os.environ.get("DATABASE_URL")
    handle = None
    if not server:
        from shared.local_services import embedded_postgres

        server, handle = embedded_postgres("bench-pg")
    name = f"aicash_bench_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    try:
        upgrade(url)
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        del handle


@contextlib.contextmanager
def uvicorn_server(app: str, env: dict[str, str], workers: int = 1) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "uvicorn"),
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={**os.environ, **env},
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{app} did not start")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "n": float(a.size),
    }


def best_of(fn: object, repeat: int, number: int) -> float:
    """Best mean seconds per call over `repeat` rounds of `number` calls (timeit's convention)."""
    import timeit

    return min(timeit.repeat(fn, repeat=repeat, number=number)) / number  # type: ignore[arg-type]
