"""Redis client with short timeouts and at most one retry: a dead cache costs milliseconds."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.settings import Settings


def create_redis(settings: Settings, client_name: str) -> aioredis.Redis | None:
    if not settings.redis_url:
        return None
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout_seconds,
        socket_connect_timeout=settings.redis_connect_timeout_seconds,
        retry=Retry(NoBackoff(), retries=1),
        health_check_interval=settings.redis_health_check_interval_seconds,
        client_name=client_name,
        decode_responses=False,
    )


class CircuitBreaker:
    """Skip a failing dependency for `cooldown_s` after an error, so each request pays for it once at most."""

    def __init__(self, cooldown_s: float = 2.0) -> None:
        self.cooldown_s = cooldown_s
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def failure(self) -> None:
        self._open_until = time.monotonic() + self.cooldown_s

    def success(self) -> None:
        self._open_until = 0.0
