"""Settings of the predictor process: the shared ones plus inference, cache, log, risk and trainer knobs.

Read once per process (`services.predictor.main`) and passed explicitly to whatever needs them.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from shared import drift
from shared.settings import Settings


class PredictorSettings(Settings):
    # Off by default here: every prediction is already recorded, with its request id, in the prediction log,
    # and a JSON line per request costs about 20 us (benchmarks/bench_stack.py).
    access_log: bool = False
    # The read key the predictor presents to the indicators service (`X-API-Key`).
    indicators_api_key: SecretStr = SecretStr("")
    # Whole-request limit for a features call; past it the client gets 503, never a hang.
    indicators_timeout_seconds: float = Field(default=2.0, gt=0)
    indicators_connect_timeout_seconds: float = Field(default=0.5, gt=0)
    indicators_max_connections: int = Field(default=64, ge=1)

    # Upper bound of a cached prediction's life; it also ends when the current bar of its timeframe closes.
    cache_ttl_seconds: int = Field(default=60, ge=1)
    # Entries of the in-process L1 in front of Redis (parsed, per worker); 0 turns it off.
    cache_l1_entries: int = Field(default=4096, ge=0)
    # Series stamps come from the ingest's NOTIFY; this poll bounds how long a missed notification is missed.
    series_poll_seconds: float = Field(default=5.0, gt=0)
    # After a Redis error the cache is skipped this long, so a dead Redis costs one request its timeout.
    cache_cooldown_seconds: float = Field(default=2.0, ge=0)

    # Registry changes arrive by LISTEN/NOTIFY; this poll catches anything a dropped connection missed.
    model_poll_seconds: float = Field(default=10.0, gt=0)

    prediction_log_flush_seconds: float = Field(default=0.2, gt=0)
    prediction_log_batch_rows: int = Field(default=500, ge=1)
    # Rows held while PostgreSQL is unreachable; beyond it the oldest are dropped (and counted).
    prediction_log_buffer_rows: int = Field(default=20_000, ge=1)
    # Window hashes remembered as written, so a window served again is not sent again.
    prediction_log_window_hashes: int = Field(default=50_000, ge=0)
    # Rows older than this are deleted by the predictor's hourly prune; 0 keeps them forever.
    prediction_log_retention_days: int = Field(default=90, ge=0)
    prediction_log_prune_interval_seconds: float = Field(default=3600.0, gt=0)

    # The trainer computes explanations (SHAP needs TensorFlow, which the predictor never loads): the predictor
    # asks it with POST {TRAINER_URL}/v1/explanations.
    trainer_url: str = "http://127.0.0.1:8082"
    # A key of the trainer API (`X-API-Key`) with the role its explanations route asks for; empty sends none
    # (a trainer with AUTH_DISABLED, local runs).
    trainer_api_key: SecretStr = SecretStr("")
    # Whole-request limit for asking the trainer; past it the client gets 503, never a hang.
    trainer_timeout_seconds: float = Field(default=2.0, gt=0)

    # user_id is stored as sha256(salt + user_id); required in production so hashes cannot be reversed by lookup.
    user_id_salt: SecretStr = SecretStr("")

    # Position sizing limits (docs/PREDICTOR.md, "Risk").
    risk_max_position_fraction: float = Field(default=0.10, gt=0, le=1)
    risk_per_trade_fraction: float = Field(default=0.01, gt=0, le=1)
    risk_stop_atr_multiple: float = Field(default=2.0, gt=0)
    risk_take_profit_atr_multiple: float = Field(default=3.0, gt=0)

    # A/B split: the salt of the hash that buckets users into the candidate's traffic share (sticky per user);
    # separate from USER_ID_SALT so re-bucketing an experiment never changes stored user hashes.
    rollout_salt: str = "aicash-rollout"

    # --- drift (docs/LIFECYCLE.md, "Drift") ---
    # Live feature counts (one per completed bar and series) are flushed to Redis every N seconds.
    drift_flush_seconds: float = Field(default=30.0, gt=0)
    # PSI and KS per feature are computed this often over the rolling window below.
    drift_check_interval_seconds: float = Field(default=3600.0, gt=0)
    # Defaults shared with the trainer, which calibrates each feature's null threshold at this window size.
    drift_window_hours: float = Field(default=drift.DEFAULT_WINDOW_HOURS, gt=0)
    # Slow timeframes (few bars in 24 h): the window widens to the last N bars of the timeframe.
    drift_min_bars: int = Field(default=drift.DEFAULT_MIN_BARS, ge=5)
    drift_psi_threshold: float = Field(default=0.25, gt=0)
    drift_ks_threshold: float = Field(default=0.3, gt=0, le=1)

    # Live performance gauges (ml_model_accuracy ...) are refreshed from settled outcomes every N seconds.
    performance_refresh_seconds: float = Field(default=60.0, gt=0)

    # --- webhooks (docs/STREAMING.md, "Webhooks"); the delivery worker (webhook_worker.py) reads these too ---
    # Loopback, private, link-local, multicast and reserved targets are refused unless this is true (trusted
    # networks and tests only: it lets an admin key make the service call anything it can reach).
    webhook_allow_private_targets: bool = False
    # The Celery queue of deliveries, on CELERY_BROKER_URL (else REDIS_URL); the worker consumes it with -Q.
    webhook_queue: str = "webhooks"
    # Tries per event and webhook (the first one included); retry n waits base * 2**(n-1), capped.
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_retry_base_seconds: float = Field(default=2.0, gt=0)
    webhook_retry_max_delay_seconds: float = Field(default=300.0, gt=0)
    # Consecutive deliveries that spent every try; then the webhook is paused until an admin unpauses it.
    webhook_pause_after_failures: int = Field(default=5, ge=1)
    # Whole-request limit of one delivery attempt (connect + send + answer).
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    webhook_resolve_timeout_seconds: float = Field(default=2.0, gt=0)
    # Bound of one publish to the broker from the predictor (a broker that accepts and never answers).
    webhook_publish_timeout_seconds: float = Field(default=2.0, gt=0)
    # Delivery attempts and dispatch claims older than this are deleted by the predictor's hourly prune.
    webhook_log_retention_days: int = Field(default=30, ge=1)

    # --- signal stream (docs/STREAMING.md) ---
    # Off: no bar-close signals are computed here and GET /v1/signals/stream answers 503.
    stream_enabled: bool = True
    # Redis keys of the stream (`{prefix}:events`, `{prefix}:last:...`, `{prefix}:lease:...`); every replica
    # of one deployment must use the same prefix (tests use one per run to share a Redis).
    stream_key_prefix: str = Field(default="signals", pattern=r"^[A-Za-z0-9:_.-]{1,64}$")
    # Events held per SSE connection; a subscriber that falls this far behind is cut (it can resume).
    stream_queue_events: int = Field(default=256, ge=1)
    # Keep-alive comment interval on an idle stream (proxies close silent connections).
    stream_ping_seconds: float = Field(default=15.0, gt=0)
    # A write to one subscriber that blocks this long (it reads nothing) ends that connection.
    stream_send_timeout_seconds: float = Field(default=30.0, gt=0)
    # Resume (Last-Event-ID) replays at most this many events from PostgreSQL (`signal_events`), no further back
    # than the hours below; it is also the Redis stream's trim length (the live fan-out).
    stream_replay_events: int = Field(default=10_000, ge=1)
    stream_replay_hours: float = Field(default=24.0, gt=0)
    # Every served series is checked this often for a completed bar nobody signalled (a lost NOTIFY, Redis
    # back after an outage); notifications trigger a check at once.
    stream_sweep_seconds: float = Field(default=5.0, gt=0)
    # The compute lease of one bar: a replica that died while computing is replaced after this long.
    stream_lease_seconds: int = Field(default=60, ge=1)
    # Series one connection may subscribe to.
    stream_max_series: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _salt_in_production(self) -> PredictorSettings:
        if self.environment == "production" and not self.user_id_salt.get_secret_value():
            raise ValueError("USER_ID_SALT must be set in production (user ids are stored salted and hashed)")
        return self
