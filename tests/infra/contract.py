"""The system's contracts as the deployment files must follow them (one place for every infra test)."""

from __future__ import annotations

from typing import TypedDict

# Metric name -> (type, labels) as the services expose them. Histograms also yield _bucket (with `le`),
# _sum and _count; counters are named with their _total suffix.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "http_requests_total": ("counter", frozenset({"handler", "status", "method"})),
    "http_request_duration_seconds": ("histogram", frozenset({"handler", "method"})),
    "ml_prediction_requests_total": ("counter", frozenset({"symbol", "result"})),
    "ml_prediction_duration_seconds": ("histogram", frozenset()),
    "ml_active_models": ("gauge", frozenset()),
    "ml_model_accuracy": ("gauge", frozenset({"model_version"})),
    "ml_feature_drift": ("gauge", frozenset({"symbol", "timeframe", "feature"})),
    "ml_feature_drift_ks": ("gauge", frozenset({"symbol", "timeframe", "feature"})),
    "ml_feature_drifted": ("gauge", frozenset({"symbol", "timeframe", "feature"})),
    "ml_prediction_cache_total": ("counter", frozenset({"result"})),
    "ml_model_load_failures_total": ("counter", frozenset({"symbol", "timeframe"})),
    "ml_model_load_refused_total": ("counter", frozenset({"reason"})),
    "ml_prediction_log_dropped_total": ("counter", frozenset()),
    "market_bars_rejected_total": ("counter", frozenset({"symbol"})),
    "market_bars_flagged_total": ("counter", frozenset({"symbol", "reason"})),
    "market_data_staleness_seconds": ("gauge", frozenset({"symbol", "timeframe"})),
    "ml_training_jobs_total": ("counter", frozenset({"status"})),
    "ml_training_duration_seconds": ("histogram", frozenset()),
    "up": ("gauge", frozenset()),
}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name a query may use -> the labels it may be matched or grouped on."""
    out: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in METRICS.items():
        labels = labels | TARGET_LABELS
        if kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = labels
            out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


SERIES = series_labels()


class Service(TypedDict):
    port: int | None
    image: str
    command: list[str]


# Service -> how it runs. Ports are the container ports; commands are exactly what compose and k8s run.
UVICORN_FLAGS = [
    "--proxy-headers",
    "--forwarded-allow-ips",
    "*",
    "--no-server-header",
    "--timeout-graceful-shutdown",
    "20",
]
SERVICES: dict[str, Service] = {
    "predictor": {
        "port": 8080,
        "image": "predictor",
        "command": ["uvicorn", "services.predictor.main:app", "--host", "0.0.0.0", "--port", "8080", *UVICORN_FLAGS],
    },
    "indicators": {
        "port": 8081,
        "image": "indicators",
        "command": ["uvicorn", "services.indicators.main:app", "--host", "0.0.0.0", "--port", "8081", *UVICORN_FLAGS],
    },
    "trainer-api": {
        "port": 8082,
        "image": "trainer",
        "command": ["uvicorn", "services.trainer.main:app", "--host", "0.0.0.0", "--port", "8082", *UVICORN_FLAGS],
    },
    "trainer-worker": {
        "port": None,
        "image": "trainer",
        "command": [
            "celery",
            "-A",
            "services.trainer.celery_app",
            "worker",
            "-Q",
            "training",
            "-c",
            "1",
            "--loglevel",
            "INFO",
            "--hostname",
            "trainer@%h",
        ],
    },
    "trainer-beat": {
        "port": None,
        "image": "trainer",
        "command": [
            "celery",
            "-A",
            "services.trainer.celery_app",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            "/tmp/celerybeat-schedule",
        ],
    },
    "webhook-worker": {
        "port": None,
        "image": "predictor",
        "command": [
            "celery",
            "-A",
            "services.predictor.webhook_worker",
            "worker",
            "-Q",
            "webhooks",
            "-c",
            "4",
            "--loglevel",
            "INFO",
            "--hostname",
            "webhooks@%h",
        ],
    },
    "migrate": {"port": None, "image": "predictor", "command": ["aicash", "db", "upgrade"]},
}

# Environment every application process is given (values differ per environment, names do not).
APP_ENV = {
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "MODEL_STORE_URL",
    "S3_ENDPOINT_URL",
    "INDICATORS_URL",
    "TRAINER_URL",
    "PREDICTOR_URL",
    "API_KEYS",
    "AUTH_DISABLED",
    "LOG_LEVEL",
    "PROMETHEUS_MULTIPROC_DIR",
    "TRAINER_QUEUE",
}
SECRET_ENV = {
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "API_KEYS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
