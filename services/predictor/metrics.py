"""The predictor's Prometheus metrics (names from the design; the alerts in monitoring/ use them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREDICTION_REQUESTS = Counter(
    "ml_prediction_requests_total",
    "Prediction requests by symbol and result (ok, client_error, not_found, unavailable, error)",
    ["symbol", "result"],
)
PREDICTION_DURATION = Histogram(
    "ml_prediction_duration_seconds",
    "Time to serve a prediction, cached or computed",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ACTIVE_MODELS = Gauge("ml_active_models", "Production models loaded and serving", multiprocess_mode="livemax")
# Filled by the outcomes job of a later issue; declared here so dashboards and alerts have the series.
MODEL_ACCURACY = Gauge(
    "ml_model_accuracy", "Directional accuracy of served signals", ["model_version"], multiprocess_mode="mostrecent"
)
CACHE = Counter("ml_prediction_cache_total", "Prediction cache lookups by result (hit, miss, error)", ["result"])
MODEL_LOAD_FAILURES = Counter(
    "ml_model_load_failures_total", "Model versions that failed to load (checksum, file, ONNX)", ["symbol", "timeframe"]
)
LOG_DROPPED = Counter("ml_prediction_log_dropped_total", "Prediction records dropped because the log buffer was full")
LOG_WRITTEN = Counter("ml_prediction_log_written_total", "Prediction records written to PostgreSQL")
LOG_PRUNED = Counter("ml_prediction_log_pruned_total", "Prediction records deleted by the retention prune")
