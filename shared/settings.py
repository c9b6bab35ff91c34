"""One settings object per process, read once at start from the environment."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Unset means "embedded default": `make up` / the test suite start a local server and set the URL.
    database_url: str | None = None
    redis_url: str | None = None
    celery_broker_url: str | None = None
    # s3://bucket/prefix (boto3) or file:///path (the embedded default).
    model_store_url: str = "file://var/models"
    s3_endpoint_url: str | None = None
    indicators_url: str = "http://127.0.0.1:8081"
    # The predictor's base URL: the operator console (trainer, /ui) reads performance, served models and the
    # signal stream from it with the signed-in user's key.
    predictor_url: str = "http://127.0.0.1:8080"
    # Comma-separated `key_id:role:secret` entries; roles read < write < admin.
    api_keys: SecretStr = SecretStr("")
    # Local runs only; logged as a warning at start.
    auth_disabled: bool = False
    log_level: str = "INFO"
    # One JSON line per request (method, path, status, duration_ms, request_id).
    access_log: bool = True

    # 0: a service starts (and reports unready) while PostgreSQL is down, instead of crash-looping.
    db_pool_min_size: int = 0
    db_pool_max_size: int = 10
    db_command_timeout_seconds: float = 10.0
    # Redis is a cache: a dead one must cost milliseconds, not the client's default seconds of retries.
    redis_socket_timeout_seconds: float = 0.05
    redis_connect_timeout_seconds: float = 0.05
    redis_health_check_interval_seconds: int = 30

    max_bars_per_request: int = Field(default=50_000, ge=1)
    # A bar whose close-to-close move exceeds this many recent standard deviations is flagged (kept).
    quality_move_sigma: float = Field(default=8.0, gt=0)
    quality_window_bars: int = Field(default=50, ge=5)

    service_name: str = "aicash"
    environment: Literal["local", "test", "production"] = "local"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
