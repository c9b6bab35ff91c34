"""Ports and server processes for tests that start real programs.

`free_port` and `wait_http` are the ones `make up` uses (shared/local_services.py): one copy of each.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

from shared.local_services import free_port, wait_http
from tests.support import REPO

__all__ = ["free_port", "free_ports", "port_free", "start_uvicorn", "stop", "stop_all", "wait_http"]


def port_free(port: int) -> bool:
    """Whether a TCP port can be bound on 127.0.0.1 right now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, also_free_at: int = 0) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now; with `also_free_at`, port + also_free_at is free as well.

    For programs that derive a second port from each one they are given (seaweedfs listens on port + 10000
    for gRPC): the OS's ephemeral port 0 cannot promise that, so ports are drawn at random and checked, below
    65536 with the offset added.
    """
    high = 55_000 - also_free_at
    if high <= 20_000:
        raise ValueError(f"also_free_at={also_free_at} leaves no port range; it must be below 35000")
    out: list[int] = []
    while len(out) < n:
        p = random.randint(20_000, high)
        if p not in out and port_free(p) and (not also_free_at or port_free(p + also_free_at)):
            out.append(p)
    return out


def start_uvicorn(module: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`uvicorn module` on 127.0.0.1:port with `env` added, output to `log`; returns once /health answers."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_http(f"http://127.0.0.1:{port}/health", 30.0, proc)
    return proc


def stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float = 5.0) -> None:
    """SIGTERM every process still running, then reap each; one that outlives `timeout_s` is killed."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout_s)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one server started by `start_uvicorn` (10 s to shut down cleanly)."""
    stop_all([proc], timeout_s=10.0)
