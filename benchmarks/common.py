"""Helpers for benchmark scripts: a temporary database, service subprocesses, latency statistics."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shared.local_services import free_port, scratch_database, wait_http

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def temporary_database() -> Iterator[str]:
    """A fresh, migrated database on DATABASE_URL's server (or an embedded one), dropped afterwards."""
    server = os.environ.get("DATABASE_URL")
    handle = None
    if not server:
        from shared.local_services import embedded_postgres

        server, handle = embedded_postgres("bench-pg")
    with scratch_database(server, "aicash_bench") as url:
        yield url
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
        wait_http(f"{base}/health", 60, proc)
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
