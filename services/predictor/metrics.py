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
# Live performance of the serving versions (production, candidate) from settled outcomes, one per (version, bar);
# refreshed every PERFORMANCE_REFRESH_SECONDS by services/predictor/performance.py.
MODEL_ACCURACY = Gauge(
    "ml_model_accuracy",
    "Settled live hit rate of a model version: share of its settled bars whose signal equals the realised label",
    ["model_version"],
    multiprocess_mode="mostrecent",
)
MODEL_SETTLED_BARS = Gauge(
    "ml_model_settled_bars",
    "Settled outcomes (bars) of a model version per variant (production, candidate, shadow)",
    ["model_version", "variant"],
    multiprocess_mode="mostrecent",
)
MODEL_BRIER = Gauge(
    "ml_model_brier",
    "Mean multiclass Brier score of a model version's settled bars (0 perfect, 2 worst)",
    ["model_version"],
    multiprocess_mode="mostrecent",
)
MODEL_PNL = Gauge(
    "ml_model_pnl",
    "Sum of a model version's settled PnL (log returns after the round-trip cost, next bar's open to horizon)",
    ["model_version"],
    multiprocess_mode="mostrecent",
)
CACHE = Counter("ml_prediction_cache_total", "Prediction cache lookups by result (hit, miss, error)", ["result"])
MODEL_LOAD_FAILURES = Counter(
    "ml_model_load_failures_total", "Model versions that failed to load (checksum, file, ONNX)", ["symbol", "timeframe"]
)
# The subset of those failures that were refusals of a stored artifact (not a store that could not be read):
# reason checksum (metadata.json or model.onnx differs from its recorded sha256), path (metadata.json names a file
# outside the version's prefix), metadata (not valid model metadata, or it describes another version), onnx (the
# file is not a model onnxruntime loads and runs).
MODEL_LOAD_REFUSED = Counter(
    "ml_model_load_refused_total",
    "Model artifacts refused at load, by reason (checksum, path, metadata, onnx)",
    ["reason"],
)
LOG_DROPPED = Counter("ml_prediction_log_dropped_total", "Prediction records dropped because the log buffer was full")
LOG_WRITTEN = Counter("ml_prediction_log_written_total", "Prediction records written to PostgreSQL")
LOG_PRUNED = Counter("ml_prediction_log_pruned_total", "Prediction records deleted by the retention prune")
STREAM_SIGNALS = Counter("ml_stream_signals_total", "Bar-close signals computed and published by this process")
STREAM_SUBSCRIBERS = Gauge(
    "ml_stream_subscribers", "Open GET /v1/signals/stream connections", multiprocess_mode="livesum"
)
STREAM_CUT = Counter("ml_stream_subscribers_cut_total", "Stream subscribers disconnected because they fell behind")
# Set on every replica from the newest stored drift check (services/predictor/drift.py), so replicas agree.
FEATURE_DRIFT = Gauge(
    "ml_feature_drift",
    "Population stability index of a feature: live bars of the drift window against the production model's "
    "training reference",
    ["symbol", "timeframe", "feature"],
    multiprocess_mode="mostrecent",
)
# 1 when the newest check found the feature over its threshold: max(DRIFT_PSI_THRESHOLD, the model's calibrated
# null threshold for the window's bar count), or the same for KS. The alert reads this, not the raw PSI: a
# driftless short window's PSI often exceeds any fixed value (docs/LIFECYCLE.md, "Drift").
FEATURE_DRIFTED = Gauge(
    "ml_feature_drifted",
    "1 when the newest drift check found the feature over its (calibrated) PSI or KS threshold, else 0",
    ["symbol", "timeframe", "feature"],
    multiprocess_mode="mostrecent",
)
FEATURE_DRIFT_KS = Gauge(
    "ml_feature_drift_ks",
    "Binned Kolmogorov-Smirnov statistic of a feature (a lower bound of the exact one) over the drift window",
    ["symbol", "timeframe", "feature"],
    multiprocess_mode="mostrecent",
)
