"""monitoring/: Prometheus config and alert rules (promtool), alert unit tests, Grafana dashboards.

Every query (alerts and dashboards) may use only the metrics the services expose (contract.METRICS) and
only their labels; a renamed metric or label in the code or here breaks a test instead of an alert.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from tests.infra.contract import METRICS, SERIES, TARGET_LABELS
from tests.infra.helpers import REPO, run
from tests.infra.promql import analyse

MON = REPO / "monitoring"
DASHBOARDS = sorted((MON / "grafana" / "dashboards").glob("*.json"))
REQUIRED_ALERTS = {
    "PredictionLatencyHigh",
    "HighHttpErrorRate",
    "NoActiveModels",
    "ModelAccuracyLow",
    "MarketDataStale",
    "BarsRejectedSpike",
    "TrainingJobFailures",
    "ServiceDown",
    "PredictionCacheErrors",
    "FeatureDrift",
}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MON / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def check_query(expr: str) -> None:
    names, matched, grouping = analyse(expr)
    unknown = names - set(SERIES)
    assert not unknown, f"{sorted(unknown)} are not metrics the services expose: {expr}"
    for name, labels in matched.items():
        assert labels <= SERIES[name], f"{name} has no label(s) {sorted(labels - SERIES[name])}: {expr}"
    allowed = set().union(*(SERIES[n] for n in names)) | TARGET_LABELS if names else set(TARGET_LABELS)
    assert grouping <= allowed, f"grouping on label(s) {sorted(grouping - allowed)} no series here has: {expr}"


# --- the query checker checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "rate(ml_predictions_total[5m]) > 0",  # misspelled metric
        'sum(rate(http_requests_total{status_code="500"}[5m]))',  # label not on the metric
        "sum by (model) (ml_model_accuracy)",  # grouping on a label nobody has
        "histogram_quantil(0.9, ml_prediction_duration_seconds_bucket)",  # unknown function
        '{__name__=~"ml_.*"}',  # hides the metric name
    ],
)
def test_query_checker_rejects_bad_queries(expr: str) -> None:
    with pytest.raises((AssertionError, ValueError)):
        check_query(expr)


def test_query_checker_accepts_good_queries() -> None:
    check_query("histogram_quantile(0.95, sum by (le) (rate(ml_prediction_duration_seconds_bucket[5m]))) > 0.1")
    check_query('market_data_staleness_seconds{timeframe="M1"} > 2 * 60 or up == 0')
    check_query('sum by (symbol) (rate(market_bars_rejected_total{symbol=~"$symbol"}[5m])) * 60')


# --- the contract against the code ------------------------------------------------------------------

# Modules that declare each service's metrics.
METRIC_MODULES = {
    "services.trainer.metrics": {"ml_training_jobs_total", "ml_training_duration_seconds"},
    "services.predictor.metrics": {
        "ml_prediction_requests_total",
        "ml_prediction_duration_seconds",
        "ml_active_models",
        "ml_model_accuracy",
        "ml_prediction_cache_total",
        "ml_model_load_failures_total",
        "ml_model_load_refused_total",
        "ml_prediction_log_dropped_total",
        "ml_feature_drift",
        "ml_feature_drift_ks",
        "ml_feature_drifted",
    },
    "services.indicators.metrics": {
        "market_bars_rejected_total",
        "market_bars_flagged_total",
        "market_data_staleness_seconds",
    },
}


def declared_metrics(module_name: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Metric name (as scraped) -> (type, labels) for every metric a module declares or collects."""
    module = importlib.import_module(module_name)
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = (str(value._type), frozenset(value._labelnames))
        elif isinstance(value, type) and value.__module__ == module_name and hasattr(value, "collect"):
            for family in value().collect():  # scrape-time collectors: their families carry the labels
                labels = frozenset(getattr(family, "_labelnames", ()))
                # a counter family is named without the `_total` its samples carry
                name = family.name + ("_total" if family.type == "counter" else "")
                found[name] = (family.type, labels)
    return found


@pytest.mark.parametrize("module_name", sorted(METRIC_MODULES))
def test_services_declare_the_metrics_the_alerts_use(module_name: str) -> None:
    declared = declared_metrics(module_name)
    for name in METRIC_MODULES[module_name]:
        assert name in declared, f"{module_name} does not declare {name}"
        kind, labels = METRICS[name]
        assert declared[name] == (kind, labels), f"{name}: code {declared[name]}, contract {(kind, labels)}"


# --- Prometheus ---------------------------------------------------------------------------------------


def test_promtool_check_config(tool: Callable[[str], str]) -> None:
    out = run([tool("promtool"), "check", "config", str(MON / "prometheus.yml")])
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules(tool: Callable[[str], str]) -> None:
    run([tool("promtool"), "check", "rules", str(MON / "alerts.yml")])


def test_promtool_test_rules(tool: Callable[[str], str]) -> None:
    out = run([tool("promtool"), "test", "rules", str(MON / "alerts_test.yml")])
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_unit_tests_catch_a_wrong_threshold(tool: Callable[[str], str], tmp_path: Path) -> None:
    """The unit tests have teeth: with the latency threshold moved to 500 ms they must fail."""
    shutil.copy(MON / "alerts_test.yml", tmp_path)
    rules = (MON / "alerts.yml").read_text()
    mutated = re.sub(r"(rate\(ml_prediction_duration_seconds_bucket\[5m\]\)\)\)\s*>\s*)0\.1", r"\g<1>0.5", rules)
    assert mutated != rules
    (tmp_path / "alerts.yml").write_text(mutated)
    out = run([tool("promtool"), "test", "rules", str(tmp_path / "alerts_test.yml")], check=False)
    assert out.returncode != 0
    assert "PredictionLatencyHigh" in out.stdout + out.stderr


def test_alert_unit_tests_cover_the_required_cases() -> None:
    tests = yaml.safe_load((MON / "alerts_test.yml").read_text())["tests"]
    cases = [(c["alertname"], bool(c["exp_alerts"])) for t in tests for c in t.get("alert_rule_test", [])]
    for required in [
        ("PredictionLatencyHigh", True),
        ("PredictionLatencyHigh", False),
        ("MarketDataStale", True),
        ("ServiceDown", True),
        ("FeatureDrift", True),
        ("FeatureDrift", False),
    ]:
        assert required in cases, f"alerts_test.yml has no case {required}"


def test_required_alerts_exist_with_severity_and_summary() -> None:
    rules = alert_rules()
    names = {str(r["alert"]) for r in rules}
    assert REQUIRED_ALERTS <= names, f"missing alerts: {sorted(REQUIRED_ALERTS - names)}"
    for r in rules:
        assert r.get("labels", {}).get("severity") in {"page", "ticket"}, r["alert"]
        assert r.get("annotations", {}).get("summary"), r["alert"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: str(r["alert"]))
def test_alert_uses_only_exposed_metrics(rule: dict[str, Any]) -> None:
    check_query(str(rule["expr"]))


def test_staleness_alert_covers_every_timeframe() -> None:
    from shared.timeframes import TIMEFRAMES

    expr = next(str(r["expr"]) for r in alert_rules() if r["alert"] == "MarketDataStale")
    limits = dict(re.findall(r'timeframe="(\w+)"\}\s*>\s*2 \* (\d+)', expr))
    assert limits == {tf.value: str(tf.seconds) for tf in TIMEFRAMES}


def test_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load((MON / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    targets = {
        job["job_name"]: sorted(t for sc in job["static_configs"] for t in sc["targets"])
        for job in config["scrape_configs"]
    }
    assert targets["predictor"] == ["predictor-1:8080", "predictor-2:8080", "predictor-3:8080"]
    assert targets["indicators"] == ["indicators:8081"]
    assert targets["trainer"] == ["trainer-api:8082"]
    compose = yaml.safe_load((REPO / "docker-compose.production.yml").read_text())["services"]
    for host_port in [t for job in ("predictor", "indicators", "trainer") for t in targets[job]]:
        assert host_port.split(":")[0] in compose, f"{host_port} is not a compose service"


# --- Grafana ------------------------------------------------------------------------------------------


def provisioned_datasource_uid() -> str:
    doc = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus"
    return str(ds["uid"])


def test_dashboard_provisioning_loads_the_dashboard_folder() -> None:
    doc = yaml.safe_load((MON / "grafana" / "provisioning" / "dashboards" / "aicash.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((REPO / "docker-compose.production.yml").read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["volumes"] if v.startswith("./"))
    assert mounts["./monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboards_exist() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"predictions", "data-quality", "training"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_and_every_panel_queries_exposed_metrics(path: Path) -> None:
    board = json.loads(path.read_text())
    uid = provisioned_datasource_uid()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"] for v in board.get("templating", {}).get("list", [])}
    panels = board["panels"]
    assert panels
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        where = f"{path.name} panel {panel['id']} ({panel['title']})"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), where
        assert panel["datasource"]["uid"] == uid, where
        assert panel.get("targets"), f"{where} has no targets"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), where
        for target in panel["targets"]:
            expr = target.get("expr", "")
            assert expr.strip(), f"{where} has an empty query"
            assert target.get("datasource", panel["datasource"])["uid"] == uid, where
            used_vars = set(re.findall(r"\$\{?([a-zA-Z_]\w*)", expr)) - {"__rate_interval", "__interval"}
            assert used_vars <= variables, f"{where} uses undefined variable(s) {used_vars - variables}"
            check_query(expr)


@pytest.mark.parametrize(
    ("board", "required"),
    [
        (
            "predictions",
            {
                "ml_prediction_requests_total",
                "ml_prediction_duration_seconds_bucket",
                "ml_prediction_cache_total",
                "ml_active_models",
                "ml_model_accuracy",
            },
        ),
        ("data-quality", {"market_data_staleness_seconds", "market_bars_rejected_total", "market_bars_flagged_total"}),
        ("training", {"ml_training_jobs_total", "ml_training_duration_seconds_sum"}),
    ],
)
def test_dashboard_shows_what_it_is_for(board: str, required: set[str]) -> None:
    doc = json.loads((MON / "grafana" / "dashboards" / f"{board}.json").read_text())
    used = set()
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            used |= analyse(target["expr"])[0]
    assert required <= used, f"{board}.json does not chart {sorted(required - used)}"
