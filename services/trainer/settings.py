"""Settings of the trainer processes (API, worker, beat, CLI): the shared ones plus schedules, retrain rules
and queue behaviour.

Read once per process (`get_trainer_settings()` in the entry points: main.py, celery_app.py, tasks.py, cli.py)
and passed explicitly, as one object, to whatever needs them.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from shared.rollouts import RolloutPolicy
from shared.settings import Settings


class TrainerSettings(Settings):
    # Every trainer field is named `trainer_*`: the shared config has no env prefix, so each reads
    # TRAINER_QUEUE, TRAINER_MAX_ATTEMPTS, ..., the names scripts and deployments set.

    # Celery queue the API enqueues to and the worker consumes (tests use a unique one per run).
    trainer_queue: str = "training"
    # Deliveries of one job that may start work before it is marked failed (worker crashes included).
    trainer_max_attempts: int = Field(default=3, ge=1)
    # Seconds before a retry after an ordinary exception (a crash of the worker is redelivered by the broker).
    trainer_retry_delay_seconds: float = Field(default=30.0, ge=0)
    # PostgreSQL unreachable or dropped (no attempt can be recorded): Celery retries of that delivery, with
    # exponential backoff base * 2**n capped at the max delay (5, 10, 20, ... 300 s: about 20 min in all).
    # After the last one the delivery gives up and the sweeper re-sends the job once PostgreSQL is back.
    trainer_db_retry_max: int = Field(default=8, ge=0, le=100)
    trainer_db_retry_base_seconds: float = Field(default=5.0, ge=0)
    trainer_db_retry_max_delay_seconds: float = Field(default=300.0, ge=0)
    # Sweeper (beat): every N seconds, re-send queued/running jobs whose job lock is free and whose row has
    # not moved for `trainer_sweep_stale_after_seconds` (a lost message, a delivery that gave up). A running job
    # holds its lock, so the threshold only has to exceed the time a queued message may wait for a worker
    # before a duplicate is sent (duplicates are harmless no-ops, just wasted deliveries).
    trainer_sweep_interval_seconds: float = Field(default=300.0, gt=0)
    trainer_sweep_stale_after_seconds: float = Field(default=1800.0, gt=0)
    # Broker client: connect and read/write timeouts of every socket (Redis and AMQP). Without them a broker
    # that accepts connections and never answers blocks a publish forever.
    trainer_broker_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    # Hard bound on one publish by the API/CLI (socket timeouts plus kombu's publish retries); past it the
    # request answers 503 and the job is marked failed.
    trainer_publish_timeout_seconds: float = Field(default=8.0, gt=0, le=120)
    # Redis broker: a message unacknowledged this long is handed out again. Must exceed the longest job
    # (the design budget for a full retrain is 2 h); the PostgreSQL job lock covers the rest.
    trainer_visibility_timeout_seconds: int = Field(default=4 * 3600, ge=1)
    # How often kombu looks for unacknowledged messages of dead workers to restore (Redis broker).
    trainer_unacked_restore_interval_seconds: int = Field(default=60, ge=1)
    # Beat: auto-retrain every N hours; full retrain weekly on this day/hour/minute (UTC, crontab syntax).
    trainer_auto_retrain_interval_hours: float = Field(default=6.0, gt=0)
    trainer_full_retrain_day_of_week: str = "sun"
    trainer_full_retrain_hour_utc: int = Field(default=2, ge=0, le=23)
    trainer_full_retrain_minute_utc: int = Field(default=0, ge=0, le=59)
    # Auto-retrain rules: a production model older than this, or this many new bars since its training range.
    trainer_max_model_age_hours: float = Field(default=7 * 24.0, gt=0)
    trainer_min_new_bars: int = Field(default=500, ge=1)
    # Default epochs of scheduled retrains (a job's params override every hyperparameter).
    trainer_scheduled_epochs: int | None = Field(default=None, ge=1)
    # After a model registers, validate it walk-forward (the promotion gate's evidence) with this many folds;
    # after a validation leaves a production model, compute its SHAP indicator weights. Off in test suites
    # that count jobs; on in deployments, where nothing should serve without a verdict for long.
    trainer_validate_after_train: bool = True
    trainer_validation_folds: int = Field(default=5, ge=2, le=20)
    trainer_weights_after_validate: bool = True
    # Background sequences for SHAP explanations of single predictions (drawn from the model's training split).
    trainer_explain_background: int = Field(default=100, ge=10, le=2000)
    # --- the model lifecycle (docs/LIFECYCLE.md) ---
    # What a version that passes the gate does on a series with no rollout row yet (a row's policy wins).
    trainer_rollout_default_policy: RolloutPolicy = "canary"
    # Canary: the traffic share a gate-passing candidate starts at, and whether it also scores in shadow.
    trainer_canary_traffic_percent: float = Field(default=10.0, ge=0, le=100)
    trainer_canary_shadow: bool = True
    # Beat: settle logged predictions whose horizon bars have arrived, every N seconds.
    trainer_settle_interval_seconds: float = Field(default=60.0, gt=0)
    # Round-trip cost (bps) charged to the PnL of a settled signal: the backtester's cost model and default.
    trainer_outcome_cost_bps: float = Field(default=2.0, ge=0, le=1000)
    # Live performance drift: the performance flag is set when the production version's settled hit rate over
    # at least `min_bars` bars falls this far below its validation accuracy (upper end of its 95 % interval).
    trainer_performance_min_bars: int = Field(default=100, ge=10)
    # Beat: the automatic promotion/rollback decision on every series with a candidate, every N seconds.
    trainer_judge_interval_seconds: float = Field(default=300.0, gt=0)
    # The sequential test: overall false-decision rate and the settled pairs needed before any decision.
    trainer_judge_alpha: float = Field(default=0.05, gt=0, lt=0.5)
    trainer_judge_min_pairs: int = Field(default=100, ge=2)
    # A candidate whose wrong-way rate (a BUY or SELL the market moved against) significantly exceeds this (the
    # lower end of its always-valid interval is above it) over at least min_pairs settled bars is rolled back
    # whatever the log-loss test says.
    trainer_judge_max_error_rate: float = Field(default=0.6, gt=0, le=1)
    # Lets a job's params carry {"fault": "exit" | "raise"} to crash on purpose; test suites only.
    trainer_fault_injection: bool = False


@lru_cache(maxsize=1)
def get_trainer_settings() -> TrainerSettings:
    return TrainerSettings()
