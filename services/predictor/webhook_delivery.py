"""One try of one webhook delivery (what the `webhooks.deliver` task of webhook_worker.py runs): the webhook
read again, its target re-checked and pinned, the signed POST, the attempt recorded, the pause rule applied.
The worker's docstring (services/predictor/webhook_worker.py) describes the guarantees."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from services.predictor import webhook_repository as repo
from services.predictor.settings import PredictorSettings
from services.predictor.webhook_targets import (
    ATTEMPT_HEADER,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Target,
    TargetRefused,
    UnresolvedTarget,
    check_target,
    signature,
)
from shared.audit import SYSTEM, record
from shared.db import require_database_url

log = logging.getLogger("predictor.webhook_delivery")

USER_AGENT = "aicash-webhooks/1"
ERROR_CHARS = 300  # of an error message or a response body kept in webhook_deliveries.error


def backoff_seconds(attempt: int, settings: PredictorSettings) -> float:
    """Seconds before try `attempt + 1` after try `attempt` failed."""
    return float(
        min(settings.webhook_retry_base_seconds * 2 ** (attempt - 1), settings.webhook_retry_max_delay_seconds)
    )


@dataclass(frozen=True)
class Outcome:
    status: str  # delivered | failed | gave_up | refused | skipped
    detail: str = ""
    retry: bool = False


def pinned_request(target: Target) -> tuple[str, dict[str, str], dict[str, Any]]:
    """URL, headers and httpx extensions that send to the checked address while naming the host (Host header,
    TLS SNI and certificate check), so the connection cannot go to a second, unchecked resolution."""
    parts = urlsplit(target.url)
    address = target.addresses[0]
    shown = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    url = urlunsplit((target.scheme, f"{shown}:{target.port}", parts.path or "/", parts.query, ""))
    default_port = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    headers = {"Host": host if target.port == default_port else f"{host}:{target.port}"}
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    return url, headers, extensions


async def _send(
    target: Target, secret: str, body: bytes, prediction_id: str, attempt: int, limit_seconds: float
) -> tuple[int | None, str | None]:
    """POST once; (HTTP status, error) with error None for a 2xx answer."""
    url, headers, extensions = pinned_request(target)
    headers.update(
        {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: signature(secret, body),
            TIMESTAMP_HEADER: str(int(time.time())),
            EVENT_ID_HEADER: prediction_id,
            ATTEMPT_HEADER: str(attempt),
        }
    )
    # trust_env=False: no proxy from the environment may carry the request elsewhere than the checked address.
    async with httpx.AsyncClient(timeout=limit_seconds, follow_redirects=False, trust_env=False) as client:
        try:
            async with asyncio.timeout(limit_seconds):
                async with client.stream("POST", url, content=body, headers=headers, extensions=extensions) as r:
                    if 200 <= r.status_code < 300:
                        return r.status_code, None
                    text = b""
                    async for chunk in r.aiter_bytes():
                        text += chunk
                        if len(text) >= ERROR_CHARS:
                            break
                    shown = text[:ERROR_CHARS].decode("utf-8", "replace").strip()
                    return r.status_code, f"HTTP {r.status_code}" + (f": {shown}" if shown else "")
        except TimeoutError:
            return None, f"no answer within {limit_seconds:g} s"
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS] or type(exc).__name__


async def _give_up(
    conn: asyncpg.Connection, webhook_id: int, settings: PredictorSettings, reason: str, *, pause_now: bool
) -> None:
    async with conn.transaction():
        paused = await repo.delivery_failed(
            conn, webhook_id, settings.webhook_pause_after_failures, reason, pause_now=pause_now
        )
        if paused is not None:
            await record(
                conn,
                actor=SYSTEM,
                action="webhook.pause",
                target=f"webhook:{webhook_id}",
                after={"paused": True, "paused_reason": reason, "failures": paused.failures},
                request_id=None,
            )
            log.warning("webhook paused", extra={"webhook_id": webhook_id, "reason": reason})


async def deliver_once(
    settings: PredictorSettings, webhook_id: int, prediction_id: str, body: bytes, attempt: int
) -> Outcome:
    """Try `attempt` of delivering one event to one webhook, recorded; says whether to retry."""
    event = uuid.UUID(prediction_id)
    conn = await asyncpg.connect(
        require_database_url(settings),
        timeout=5.0,
        command_timeout=settings.db_command_timeout_seconds,
        server_settings={"application_name": "aicash-webhook-worker"},
    )
    try:
        hook = await repo.delivery_target(conn, webhook_id)
        if hook is None:
            return Outcome("skipped", "webhook deleted")
        if hook.paused:
            return Outcome("skipped", "webhook paused")
        done = await repo.recorded_attempts(conn, webhook_id, event)
        if "delivered" in done.values():
            return Outcome("skipped", "delivered already")
        if attempt in done:  # a redelivered message: this try was made and recorded; carry on from there
            before = done[attempt]
            return Outcome(before, "recorded already", retry=before == "failed")
        start = time.perf_counter()
        http_status: int | None = None
        error: str | None
        try:
            target = await check_target(
                hook.url,
                allow_private=settings.webhook_allow_private_targets,
                timeout_seconds=settings.webhook_resolve_timeout_seconds,
            )
        except UnresolvedTarget as exc:  # DNS may recover: a failed attempt, retried, not a refusal
            error = exc.message
        except TargetRefused as exc:
            await repo.record_attempt(conn, webhook_id, event, attempt, "refused", None, exc.message, None)
            await _give_up(conn, webhook_id, settings, f"target refused at delivery: {exc.message}", pause_now=True)
            return Outcome("refused", exc.message)
        else:
            http_status, error = await _send(
                target, hook.secret, body, prediction_id, attempt, settings.webhook_timeout_seconds
            )
        duration_ms = round((time.perf_counter() - start) * 1000, 3)
        if error is None:
            async with conn.transaction():
                await repo.record_attempt(conn, webhook_id, event, attempt, "delivered", http_status, None, duration_ms)
                await repo.delivery_succeeded(conn, webhook_id)
            return Outcome("delivered")
        last = attempt >= settings.webhook_max_attempts
        status: repo.DeliveryStatus = "gave_up" if last else "failed"
        await repo.record_attempt(conn, webhook_id, event, attempt, status, http_status, error, duration_ms)
        if last:
            await _give_up(
                conn,
                webhook_id,
                settings,
                f"{settings.webhook_pause_after_failures} deliveries in a row failed after "
                f"{settings.webhook_max_attempts} tries each; last error: {error}",
                pause_now=False,
            )
            return Outcome("gave_up", error)
        return Outcome("failed", error, retry=True)
    finally:
        await conn.close()
