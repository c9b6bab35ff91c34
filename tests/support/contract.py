"""The three services as real uvicorn processes for the contract test, and schemathesis run against each.

The predictor gets what a user's deployment has: bars in the indicators service (ingested over HTTP), a
production model in a file store with its registry row, the real trainer API (its Celery messages go to a
queue of this run's own that nobody consumes, deleted afterwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shared.bars import bars_to_rows
from shared.storage import store_from_url
from tests.data import generate_bars
from tests.predictor.model_factory import feature_scaler, register, write_model
from tests.support import REPO
from tests.support.keys import API_KEYS, WRITE_KEY
from tests.support.net import free_port, stop_all, wait_http
from tests.support.predictor import predictor_env

SYMBOL = "CONTRACT"
ACCEPTED_FAILURES = REPO / "tests" / "contract" / "accepted_failures.json"
SERVICES = ("indicators", "trainer", "predictor")


@contextlib.contextmanager
def running_services(database_url: str, redis_url: str, work: Path) -> Iterator[dict[str, str]]:
    """Start indicators, trainer and predictor (uvicorn, free ports); yield their base URLs by name."""
    from shared.features import feature_rows

    procs: list[subprocess.Popen[bytes]] = []
    queue = f"contract-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        urls: dict[str, str] = {}
        port = free_port()
        env = {"DATABASE_URL": database_url, "API_KEYS": API_KEYS, "ENVIRONMENT": "test"}
        procs.append(start_uvicorn("services.indicators.main:app", port, env, work / "indicators.log"))
        urls["indicators"] = f"http://127.0.0.1:{port}"

        bars = generate_bars("H1", 3000, seed=11)
        with httpx.Client(base_url=urls["indicators"], headers={"X-API-Key": WRITE_KEY}, timeout=60) as client:
            r = client.post(f"/v1/bars/{SYMBOL}/H1", json={"bars": bars_to_rows(bars)})
            r.raise_for_status()
        store_url = f"file://{work / 'models'}"
        store = store_from_url(store_url)
        mean, scale = feature_scaler(feature_rows(bars).values)
        sha = write_model(store, SYMBOL, "H1", "v1", seed=1, mean=mean, scale=scale)
        asyncio.run(register(database_url, store, SYMBOL, "H1", "v1", sha))

        port = free_port()
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "TRAINER_QUEUE": queue,
            "API_KEYS": API_KEYS,
            "ENVIRONMENT": "test",
        }
        procs.append(start_uvicorn("services.trainer.main:app", port, env, work / "trainer.log"))
        urls["trainer"] = f"http://127.0.0.1:{port}"

        port = free_port()
        env = predictor_env(
            database_url,
            redis_url,
            urls["indicators"],
            store_url,
            TRAINER_URL=urls["trainer"],
            TRAINER_API_KEY=WRITE_KEY,
        )
        procs.append(start_uvicorn("services.predictor.main:app", port, env, work / "predictor.log"))
        urls["predictor"] = f"http://127.0.0.1:{port}"
        yield urls
    finally:
        stop_all(procs, timeout_s=10.0)
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=2)
        client.delete(queue)
        client.close()


def start_uvicorn(module: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """tests.support.net.start_uvicorn with a longer wait: three services start at once on a loaded machine
    (the predictor's start took over 30 s there)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120.0, proc)
    except BaseException:
        stop_all([proc])
        raise
    return proc


@dataclass(frozen=True)
class Run:
    """One schemathesis run: its exit status, console output and the failures it found (from its JSON report)."""

    returncode: int
    output: str
    report: dict[str, Any]


def schemathesis_run(
    base_url: str,
    report: Path,
    *,
    key: str | None,
    max_time_s: int,
    baseline: Path | None = ACCEPTED_FAILURES,
    seed: int = 1,
) -> Run:
    """`schemathesis run` as a user runs it: all checks, examples + coverage + fuzzing, a time budget."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-time",
        str(max_time_s),
        "--seed",
        str(seed),
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--output-truncate",
        "false",
        "--no-color",
    ]
    if key:
        cmd += ["-H", f"X-API-Key: {key}"]
    if baseline is not None:
        cmd += ["--baseline", str(baseline)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max_time_s * 4 + 120, check=False)
    document: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    return Run(proc.returncode, proc.stdout + proc.stderr, document)
