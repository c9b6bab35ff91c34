"""The broker configuration both Celery apps share: the trainer's jobs (services/trainer/celery_app.py) and the
predictor's webhook deliveries (services/predictor/webhooks.py).

Plain dicts only: this module never imports Celery, so a service that builds its app lazily (the predictor loads
Celery only once it has a delivery to publish) can import it at module level.
"""

from __future__ import annotations

from typing import Any

from shared.settings import Settings

# A publish that cannot reach the broker is retried once, quickly; the caller bounds the whole send.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


def broker_url(settings: Settings) -> str:
    return settings.celery_broker_url or settings.redis_url or "redis://127.0.0.1:6379/0"


def is_amqp(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("amqp", "amqps", "pyamqp")


def transport_options(
    url: str, *, timeout_seconds: float, visibility_timeout_seconds: float, **redis_extra: Any
) -> dict[str, Any]:
    """Per broker: socket timeouts on every connection (a silent broker must not block a publish forever).

    Redis: an unacknowledged message is handed out again after `visibility_timeout_seconds`; `redis_extra` adds
    options of the Redis transport. AMQP: py-amqp's connect timeout comes from broker_connection_timeout; these
    bound every frame read and write (RabbitMQ has no visibility timeout: its consumer_timeout stands in)."""
    if is_amqp(url):
        return {"read_timeout": timeout_seconds, "write_timeout": timeout_seconds}
    return {
        "visibility_timeout": visibility_timeout_seconds,
        **redis_extra,
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "socket_keepalive": True,
    }


def base_conf(
    url: str, *, queue: str, task_prefix: str, connection_timeout_seconds: float, transport: dict[str, Any]
) -> dict[str, Any]:
    """The `app.conf` both apps start from: JSON only, no result backend, at-least-once delivery (acks_late,
    handed back when the worker dies, one message at a time), tasks named `<task_prefix>.*` routed to `queue`."""
    return {
        "broker_url": url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": connection_timeout_seconds,
        # JSON only: a pickle message is code execution for whoever can write to the broker.
        "task_serializer": "json",
        "accept_content": ["json"],
        # Outcomes live in PostgreSQL (training_jobs, webhook_deliveries); no result backend to run or to leak.
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": queue,
        "task_routes": {f"{task_prefix}.*": {"queue": queue}},
        "task_publish_retry": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
        "broker_transport_options": transport,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
    }
