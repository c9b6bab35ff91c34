"""`/metrics` with several uvicorn workers (multiprocess mode) counts every worker's requests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from shared.local_services import free_port, wait_http
from tests.support.keys import API_KEYS, READ_KEY

BIN = Path(sys.executable).parent


def _samples(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_aggregate_across_two_workers(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "API_KEYS": API_KEYS, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [
            str(BIN / "uvicorn"),
            "services.indicators.main:app",
            "--port",
            str(port),
            "--workers",
            "2",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", 60, proc)
        pids = set()
        n = 60
        for _ in range(n):
            # a new connection each time, so the kernel spreads them over both workers
            r = httpx.get(f"{base}/v1/indicators/catalog", headers={"X-API-Key": READ_KEY})
            assert r.status_code == 200
        for f in tmp_path.glob("counter_*.db"):
            pids.add(f.name)
        assert len(pids) == 2, f"expected both workers to have served: {pids}"
        text = httpx.get(f"{base}/metrics").text
        assert _samples(text, "http_requests_total", handler="/v1/indicators/catalog", status="200") == n
    finally:
        proc.terminate()
        proc.wait(10)
