"""The webhook delivery worker: `celery -A services.predictor.webhook_worker worker -Q webhooks`.

It runs from the predictor's image and settings (no TensorFlow: it imports Celery, httpx and asyncpg only).
The predictor API publishes `webhooks.deliver(webhook_id, prediction_id, body)` by name
(services/predictor/webhooks.py); each message is one try of one event for one webhook:

- before every try the webhook is read again (deleted or paused: nothing is sent) and its URL re-resolved
  under the target rule, and the request goes to the address that was checked (no second DNS lookup in
  between, so a name re-pointed at a private address is refused, not followed);
- the body is POSTed byte for byte, signed (`X-AICash-Signature: sha256=<hex HMAC-SHA256(secret, body)>`);
  a 2xx answer is a delivery, anything else (an error, a timeout, a redirect, another status) a failed try;
- a failed try is retried through Celery with exponential backoff (WEBHOOK_RETRY_BASE_SECONDS * 2**(n-1),
  capped at WEBHOOK_RETRY_MAX_DELAY_SECONDS) up to WEBHOOK_MAX_ATTEMPTS tries; each try is one
  webhook_deliveries row, unique per (webhook, event, attempt), so a redelivered message sends nothing twice
  once its try is recorded;
- a delivery whose last try failed counts one failure; WEBHOOK_PAUSE_AFTER_FAILURES in a row pause the
  webhook (a delivered event resets the count). A target refused at delivery time pauses it at once.

Delivery is at least once: a worker killed between the receiver's answer and the row's insert sends that try
again. Receivers deduplicate on X-AICash-Event-Id.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from celery import Task

from services.predictor.settings import PredictorSettings
from services.predictor.webhook_delivery import backoff_seconds, deliver_once
from services.predictor.webhooks import DELIVER_TASK, create_celery
from shared.logging import configure_logging

log = logging.getLogger("predictor.webhook_worker")

# PostgreSQL unreachable: the message is retried this many times (1 s, 2 s, ... capped at 30 s) before it is
# dropped with a log line; those retries are not delivery attempts.
DB_RETRY_MAX = 10

# The worker's app: this module is its entry point, so it reads the process's settings here (the predictor API
# never imports it; it publishes by task name).
settings = PredictorSettings()
configure_logging("webhook-worker", settings.log_level)
app = create_celery(settings, current=True)


@app.task(name=DELIVER_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def deliver(
    self: Task, webhook_id: int, prediction_id: str, body: str, attempt: int = 1, db_failures: int = 0
) -> dict[str, Any]:
    """One try of one event for one webhook; a failed try schedules the next one with backoff."""
    try:
        outcome = asyncio.run(deliver_once(settings, webhook_id, prediction_id, body.encode(), attempt))
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError) as exc:
        if db_failures >= DB_RETRY_MAX:
            log.error(
                "webhook delivery dropped: PostgreSQL unreachable",
                extra={"webhook_id": webhook_id, "prediction_id": prediction_id, "error": str(exc)},
            )
            return {"status": "database_unavailable"}
        raise self.retry(
            countdown=min(2.0**db_failures, 30.0), kwargs={"attempt": attempt, "db_failures": db_failures + 1}
        ) from None
    log.info(
        "webhook delivery",
        extra={"webhook_id": webhook_id, "prediction_id": prediction_id, "attempt": attempt, "status": outcome.status},
    )
    if outcome.retry:
        raise self.retry(
            countdown=backoff_seconds(attempt, settings),
            kwargs={"attempt": attempt + 1, "db_failures": 0},
            max_retries=None,
        )
    return {"status": outcome.status, "attempt": attempt, "detail": outcome.detail}
