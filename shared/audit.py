"""The append-only audit trail (table `audit_log`, docs/LIFECYCLE.md): who did what, before and after, with the
evidence, written on the connection (and so in the transaction) of the change it records. The database refuses
UPDATE, DELETE and TRUNCATE on the table by trigger (migration 0005)."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from shared.logging import request_id_var

SYSTEM = "system"  # the actor of every automatic decision


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    actor: str,
    action: str,
    symbol: str | None = None,
    timeframe: str | None = None,
    target: str | None = None,
    before: Any = None,
    after: Any = None,
    evidence: Any = None,
    request_id: str | None = None,
) -> int:
    """Append one audit row; returns its id. Call it on the connection of the change, inside its transaction,
    so the row and the change commit (or roll back) together. The request id defaults to the current
    request's (X-Request-ID)."""
    row_id: int = await conn.fetchval(
        "INSERT INTO audit_log (actor, action, symbol, timeframe, target, before, after, evidence, request_id) "
        "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8::jsonb, $9) RETURNING id",
        actor,
        action,
        symbol,
        timeframe,
        target,
        _json(before),
        _json(after),
        _json(evidence),
        request_id if request_id is not None else request_id_var.get(),
    )
    return row_id
