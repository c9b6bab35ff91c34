"""All SQL of webhooks (migration 0006): subscriptions, the per-event dispatch claim and delivery attempts.

Used by the predictor API and dispatcher (services/predictor/webhooks.py) and by the delivery worker
(services/predictor/webhook_worker.py). Rows become the pydantic models below; the secret leaves this module
only through `delivery_target`, for signing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg
from pydantic import BaseModel, Field

DeliveryStatus = Literal["delivered", "failed", "gave_up", "refused"]

_COLUMNS = (
    "id, url, series, created_by, created_at, updated_at, paused, paused_reason, paused_at, failures, "
    "last_success_at, last_failure_at"
)


class Webhook(BaseModel):
    id: int
    url: str
    series: list[str] = Field(description='subscribed series, "SYMBOL:TIMEFRAME"')
    created_by: str = Field(description="the API key id that created it")
    created_at: datetime
    updated_at: datetime
    paused: bool = Field(description="a paused webhook receives nothing until an admin unpauses it (PATCH)")
    paused_reason: str | None
    paused_at: datetime | None
    failures: int = Field(description="consecutive deliveries that failed every try; reset by a delivered one")
    last_success_at: datetime | None
    last_failure_at: datetime | None


class Delivery(BaseModel):
    id: int
    webhook_id: int
    prediction_id: str = Field(description="the event id (X-AICash-Event-Id)")
    attempt: int = Field(description="1 for the first try, then one more per retry")
    status: DeliveryStatus = Field(
        description="delivered (2xx), failed (retried), gave_up (the last try failed), refused (the target's "
        "address broke the webhook target rule at delivery time)"
    )
    http_status: int | None
    error: str | None
    duration_ms: float | None
    at: datetime


@dataclass(frozen=True)
class DeliveryTarget:
    url: str
    secret: str
    paused: bool


def _webhook(row: asyncpg.Record) -> Webhook:
    return Webhook(**dict(row))


async def create_webhook(
    conn: asyncpg.Connection, url: str, series: list[str], secret: str, created_by: str
) -> Webhook:
    row = await conn.fetchrow(
        f"INSERT INTO webhooks (url, series, secret, created_by) VALUES ($1, $2, $3, $4) RETURNING {_COLUMNS}",  # noqa: S608
        url,
        series,
        secret,
        created_by,
    )
    assert row is not None
    return _webhook(row)


async def list_webhooks(conn: asyncpg.Connection | asyncpg.Pool) -> list[Webhook]:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM webhooks ORDER BY id")  # noqa: S608
    return [_webhook(r) for r in rows]


async def get_webhook(conn: asyncpg.Connection | asyncpg.Pool, webhook_id: int) -> Webhook | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM webhooks WHERE id = $1", webhook_id)  # noqa: S608
    return None if row is None else _webhook(row)


async def delete_webhook(conn: asyncpg.Connection, webhook_id: int) -> Webhook | None:
    row = await conn.fetchrow(f"DELETE FROM webhooks WHERE id = $1 RETURNING {_COLUMNS}", webhook_id)  # noqa: S608
    return None if row is None else _webhook(row)


async def set_paused(conn: asyncpg.Connection, webhook_id: int, paused: bool, reason: str | None) -> Webhook | None:
    """Pause (with a reason) or unpause (clearing the reason and the failure count)."""
    row = await conn.fetchrow(
        f"""
        UPDATE webhooks SET paused = $2,
                            paused_reason = CASE WHEN $2 THEN $3 ELSE NULL END,
                            paused_at = CASE WHEN $2 THEN now() ELSE NULL END,
                            failures = CASE WHEN $2 THEN failures ELSE 0 END,
                            updated_at = now()
        WHERE id = $1 RETURNING {_COLUMNS}
        """,  # noqa: S608
        webhook_id,
        paused,
        reason,
    )
    return None if row is None else _webhook(row)


async def subscribed(conn: asyncpg.Connection, series: str) -> list[int]:
    """Ids of the webhooks not paused that subscribe to `series` ("SYMBOL:TIMEFRAME")."""
    rows = await conn.fetch(
        "SELECT id FROM webhooks WHERE NOT paused AND series @> ARRAY[$1::text] ORDER BY id", series
    )
    return [r["id"] for r in rows]


async def claim_dispatch(
    conn: asyncpg.Connection, prediction_id: uuid.UUID, symbol: str, timeframe: str, webhooks: int
) -> bool:
    """True for the one caller (across every replica) that records this event first."""
    row = await conn.fetchval(
        "INSERT INTO webhook_dispatches (prediction_id, symbol, timeframe, webhooks) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (prediction_id) DO NOTHING RETURNING true",
        prediction_id,
        symbol,
        timeframe,
        webhooks,
    )
    return bool(row)


async def delivery_target(conn: asyncpg.Connection, webhook_id: int) -> DeliveryTarget | None:
    row = await conn.fetchrow("SELECT url, secret, paused FROM webhooks WHERE id = $1", webhook_id)
    return None if row is None else DeliveryTarget(row["url"], row["secret"], row["paused"])


async def recorded_attempts(
    conn: asyncpg.Connection, webhook_id: int, prediction_id: uuid.UUID
) -> dict[int, DeliveryStatus]:
    """Attempts already recorded for this event and webhook (a redelivered message finds its own)."""
    rows = await conn.fetch(
        "SELECT attempt, status FROM webhook_deliveries WHERE webhook_id = $1 AND prediction_id = $2",
        webhook_id,
        prediction_id,
    )
    return {r["attempt"]: r["status"] for r in rows}


async def record_attempt(
    conn: asyncpg.Connection,
    webhook_id: int,
    prediction_id: uuid.UUID,
    attempt: int,
    status: DeliveryStatus,
    http_status: int | None,
    error: str | None,
    duration_ms: float | None,
) -> bool:
    """Record one attempt; False when this attempt was recorded already (or the webhook was deleted)."""
    row = await conn.fetchval(
        """
        INSERT INTO webhook_deliveries (webhook_id, prediction_id, attempt, status, http_status, error, duration_ms)
        SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = $1)
        ON CONFLICT (webhook_id, prediction_id, attempt) DO NOTHING RETURNING true
        """,
        webhook_id,
        prediction_id,
        attempt,
        status,
        http_status,
        error,
        duration_ms,
    )
    return bool(row)


async def delivery_succeeded(conn: asyncpg.Connection, webhook_id: int) -> None:
    await conn.execute(
        "UPDATE webhooks SET failures = 0, last_success_at = now() WHERE id = $1 AND NOT paused", webhook_id
    )


async def delivery_failed(
    conn: asyncpg.Connection, webhook_id: int, pause_after: int, reason: str, *, pause_now: bool = False
) -> Webhook | None:
    """Count one failed delivery; the webhook is paused once `pause_after` follow in a row (or `pause_now`).

    Returns the webhook when this call paused it, else None.
    """
    row = await conn.fetchrow(
        f"""
        UPDATE webhooks SET failures = failures + 1,
                            last_failure_at = now(),
                            paused = true,
                            paused_reason = $3,
                            paused_at = now(),
                            updated_at = now()
        WHERE id = $1 AND NOT paused AND ($4 OR failures + 1 >= $2)
        RETURNING {_COLUMNS}
        """,  # noqa: S608
        webhook_id,
        pause_after,
        reason,
        pause_now,
    )
    if row is not None:
        return _webhook(row)
    await conn.execute(
        "UPDATE webhooks SET failures = failures + 1, last_failure_at = now() WHERE id = $1 AND NOT paused",
        webhook_id,
    )
    return None


async def list_deliveries(conn: asyncpg.Connection | asyncpg.Pool, webhook_id: int, limit: int) -> list[Delivery]:
    rows = await conn.fetch(
        "SELECT id, webhook_id, prediction_id::text AS prediction_id, attempt, status, http_status, error, "
        "duration_ms, at FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        webhook_id,
        limit,
    )
    return [Delivery(**dict(r)) for r in rows]


async def prune(conn: asyncpg.Connection | asyncpg.Pool, retention_days: int) -> tuple[int, int]:
    """Delete delivery attempts and dispatch claims older than `retention_days`; returns both counts."""
    deliveries = await conn.execute(
        "DELETE FROM webhook_deliveries WHERE at < now() - make_interval(days => $1)", retention_days
    )
    dispatches = await conn.execute(
        "DELETE FROM webhook_dispatches WHERE dispatched_at < now() - make_interval(days => $1)", retention_days
    )
    return int(deliveries.split()[-1]), int(dispatches.split()[-1])
