"""Constants and settings of the predictor tests (the fixtures are in tests/predictor/conftest.py)."""

from __future__ import annotations

from services.predictor.settings import PredictorSettings
from tests.support.keys import API_KEYS, READ_KEY

SYMBOL = "PRED1"  # H1 bars, models on H1 and H4
SYMBOL2 = "PRED2"  # H1 bars, no model: 404
SHORT = "PRED3"  # too few bars for the model's window
N_BARS = 3000
TRAINER_KEY = "test-trainer-key-0001"


def predictor_settings(
    database_url: str, redis_url: str | None, indicators_url: str, store_url: str, **extra: object
) -> PredictorSettings:
    """Predictor settings for the test services; `extra` overrides any field (e.g. a dead Redis)."""
    values: dict[str, object] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "indicators_url": indicators_url,
        "indicators_api_key": READ_KEY,
        "api_keys": API_KEYS,
        "model_store_url": store_url,
        "model_poll_seconds": 1.0,
        "prediction_log_flush_seconds": 0.05,
        "environment": "test",
        "user_id_salt": "test-salt",
        # The suite shares 2 cores with PostgreSQL, Redis and uvicorn processes: a 50 ms Redis timeout can
        # fire under that load and skip the cache for the cooldown. Tests of a dead Redis refuse
        # connections, which fails at once whatever the timeout.
        "redis_socket_timeout_seconds": 1.0,
        "redis_connect_timeout_seconds": 1.0,
    }
    values.update(extra)
    return PredictorSettings(**values)  # type: ignore[arg-type]


def predictor_env(
    database_url: str, redis_url: str, indicators_url: str, store_url: str, **extra: str
) -> dict[str, str]:
    """The environment of a predictor process (uvicorn, the CLI) on the test services; `extra` adds or overrides
    variables (MODEL_POLL_SECONDS="1", ...)."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "INDICATORS_URL": indicators_url,
        "INDICATORS_API_KEY": READ_KEY,
        "API_KEYS": API_KEYS,
        "MODEL_STORE_URL": store_url,
        "ENVIRONMENT": "test",
        **extra,
    }
