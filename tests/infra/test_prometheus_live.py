"""A real Prometheus (Debian's) scrapes the three services running as uvicorn processes, with a config
generated from monitoring/prometheus.yml (only the targets and intervals changed): every target is up, the
design's metrics have series, and every alert rule in monitoring/alerts.yml evaluates without error."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from shared.bars import bars_to_rows
from shared.features import feature_rows
from shared.storage import store_from_url
from tests.data import generate_bars
from tests.predictor.model_factory import feature_scaler, register, write_model
from tests.support import REPO
from tests.support.keys import API_KEYS, READ_KEY, WRITE_KEY
from tests.support.net import free_port, start_uvicorn, stop_all, wait_http

MONITORING = REPO / "monitoring"
SYMBOL = "PROMLIVE"
DESIGN_METRICS = [
    "ml_prediction_requests_total",
    "ml_prediction_duration_seconds_count",
    "ml_model_accuracy",
    "ml_active_models",
]


async def settle_two_bars(database_url: str) -> None:
    """Two settled outcomes of the production model, so that ml_model_accuracy has a value (one hit)."""
    conn = await asyncpg.connect(database_url)
    try:
        for i, hit in enumerate((True, False)):
            await conn.execute(
                "INSERT INTO bar_outcomes (symbol, timeframe, model_version, variant, bar_ts, prediction_id, "
                "probabilities, signal, confidence, horizon, realised_log_return, realised_label, hit, pnl) "
                "VALUES ($1, 'H1', 'v1', 'production', $2, $3, $4, 'BUY', 0.5, 5, 0.01, $5, $6, 0.01)",
                SYMBOL,
                datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=i),
                uuid.uuid4(),
                [0.2, 0.3, 0.5],
                "BUY" if hit else "SELL",
                hit,
            )
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def services(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """indicators, trainer API and predictor (one production model, one prediction made); job -> port."""
    logs = tmp_path_factory.mktemp("prom-services")
    store_url = f"file://{logs / 'models'}"
    procs: list[subprocess.Popen[bytes]] = []
    ports = {"indicators": free_port(), "trainer": free_port(), "predictor": free_port()}
    base = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "API_KEYS": API_KEYS, "ENVIRONMENT": "test"}
    try:
        procs.append(start_uvicorn("services.indicators.main:app", ports["indicators"], base, logs / "ind.log"))
        indicators = f"http://127.0.0.1:{ports['indicators']}"
        bars = generate_bars("H1", 700, seed=11)
        r = httpx.post(
            f"{indicators}/v1/bars/{SYMBOL}/H1",
            json={"bars": bars_to_rows(bars)},
            headers={"X-API-Key": WRITE_KEY},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        mean, scale = feature_scaler(feature_rows(bars).values)
        store = store_from_url(store_url)
        sha = write_model(store, SYMBOL, "H1", "v1", mean=mean, scale=scale)
        asyncio.run(register(database_url, store, SYMBOL, "H1", "v1", sha))
        asyncio.run(settle_two_bars(database_url))
        trainer_env = {**base, "CELERY_BROKER_URL": redis_url, "TRAINER_QUEUE": f"prom-live-{os.getpid()}"}
        procs.append(start_uvicorn("services.trainer.main:app", ports["trainer"], trainer_env, logs / "trainer.log"))
        predictor_env = {
            **base,
            "INDICATORS_URL": indicators,
            "INDICATORS_API_KEY": READ_KEY,
            "TRAINER_URL": f"http://127.0.0.1:{ports['trainer']}",
            "MODEL_STORE_URL": store_url,
            "USER_ID_SALT": "test-salt",
            "PERFORMANCE_REFRESH_SECONDS": "1",
        }
        procs.append(start_uvicorn("services.predictor.main:app", ports["predictor"], predictor_env, logs / "pred.log"))
        predictor = f"http://127.0.0.1:{ports['predictor']}"
        wait_http(f"{predictor}/health/ready", 60)
        r = httpx.post(
            f"{predictor}/v1/predictions",
            json={"symbol": SYMBOL, "timeframe": "H1"},
            headers={"X-API-Key": READ_KEY},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        yield ports
    finally:
        stop_all(procs)


def generated_config(ports: dict[str, int], prometheus_port: int) -> dict[str, Any]:
    """monitoring/prometheus.yml with loopback targets, 1 s intervals and an absolute rule-file path."""
    config: dict[str, Any] = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"prometheus", "predictor", "indicators", "trainer"}, sorted(jobs)
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    for job in ("predictor", "indicators", "trainer"):
        jobs[job]["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job]}"]}]
    return config


@pytest.fixture(scope="module")
def prometheus(
    tool: Callable[[str], str], services: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(generated_config(services, port)))
    with (tmp / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_all([proc])


def query(base: str, expr: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.status_code} {body}"
    data: dict[str, Any] = body["data"]
    return data


def wait_for(base: str, expr: str, ok: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        result: list[dict[str, Any]] = query(base, expr)["result"]
        if ok(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{expr} still {result} after {timeout_s:.0f} s", pytrace=False)
        time.sleep(0.5)


def test_every_target_is_up(prometheus: str) -> None:
    result = wait_for(prometheus, "up", lambda r: len(r) == 4 and all(s["value"][1] == "1" for s in r))
    assert {s["metric"]["job"] for s in result} == {"prometheus", "predictor", "indicators", "trainer"}


@pytest.mark.parametrize("metric", DESIGN_METRICS)
def test_design_metrics_have_series(prometheus: str, metric: str) -> None:
    result = wait_for(prometheus, metric, lambda r: bool(r))
    assert {s["metric"]["job"] for s in result} == {"predictor"}
    if metric == "ml_active_models":
        assert float(result[0]["value"][1]) >= 1
    if metric == "ml_model_accuracy":
        assert [(s["metric"]["model_version"], s["value"][1]) for s in result] == [("v1", "0.5")]


def test_every_alert_expression_evaluates(prometheus: str) -> None:
    wait_for(prometheus, "up", lambda r: len(r) == 4)
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert len(exprs) >= 10
    for expr in exprs.values():
        query(prometheus, expr)  # fails on a parse or evaluation error
    # Prometheus's own rule evaluation reports the same: every rule healthy once it has been evaluated.
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()
        health = {rule["name"]: rule["health"] for g in r["data"]["groups"] for rule in g["rules"]}
        if set(health) >= set(exprs) and all(h != "unknown" for h in health.values()):
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert {n: h for n, h in health.items() if h != "ok"} == {}


def test_a_broken_expression_is_reported(prometheus: str) -> None:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": "sum by (job) (rate(up[5m]"}, timeout=10)
    assert r.status_code == 400 and r.json()["errorType"] == "bad_data"


def test_generated_config_only_changes_targets_and_intervals(tmp_path: Path, tool: Callable[[str], str]) -> None:
    config = generated_config({"predictor": 1, "indicators": 2, "trainer": 3}, 4)
    original = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    for a, b in zip(config["scrape_configs"], original["scrape_configs"], strict=True):
        assert {k: v for k, v in a.items() if k != "static_configs"} == {
            k: v for k, v in b.items() if k != "static_configs"
        }
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([tool("promtool"), "check", "config", str(path)], check=True, capture_output=True, timeout=60)
