"""Webhooks for systems that cannot hold a stream open: the admin API (`/v1/webhooks`), the dispatcher that
turns each published bar-close signal into one Celery task per subscribed webhook, and the Celery app both
sides configure (the predictor only publishes; `services/predictor/webhook_worker.py` delivers).

Every predictor replica sees every published signal event; a row in `webhook_dispatches` keyed by the
prediction id makes exactly one of them enqueue the deliveries. Deliveries are published after that
transaction commits, by task name, so this module never imports the worker (nor anything heavy).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Final

import anyio
import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from services.predictor import webhook_repository as repo
from services.predictor.deps import predictor_of
from services.predictor.schemas import WEBHOOK_ID_SCHEMA
from services.predictor.settings import PredictorSettings
from services.predictor.streaming import SignalEvent
from services.predictor.webhook_repository import Delivery, Webhook
from services.predictor.webhook_targets import check_target
from shared import audit, celery_config
from shared.app import periodic
from shared.auth import AdminKey
from shared.errors import NotFoundError, ValidationFailed, error_responses, handler_checked
from shared.timeframes import check_symbol, parse_timeframe

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("predictor.webhooks")

DELIVER_TASK: Final = "webhooks.deliver"
MAX_SERIES = 50
PRUNE_INTERVAL_SECONDS = 3600.0


# --- the Celery app (publisher here, worker in webhook_worker.py) ---


def _transport_options(url: str, settings: PredictorSettings) -> dict[str, Any]:
    return celery_config.transport_options(
        url,
        timeout_seconds=settings.webhook_publish_timeout_seconds,
        # A retry waits in the worker as an ETA message, unacknowledged: the Redis transport hands it out again
        # after visibility_timeout, so it must exceed the longest backoff plus one attempt.
        visibility_timeout_seconds=settings.webhook_retry_max_delay_seconds + settings.webhook_timeout_seconds + 600,
    )


def create_celery(settings: PredictorSettings, *, current: bool = False) -> Celery:
    """The webhook deliveries' Celery app (connects lazily, on the first publish or when a worker starts)."""
    # Imported here: the predictor API loads Celery only once it has a delivery to publish (most replicas of a
    # deployment without webhooks never do; tests/test_architecture.py keeps `main` free of it).
    from celery import Celery

    url = celery_config.broker_url(settings)
    app = Celery("aicash-webhooks", set_as_current=current)
    app.conf.update(
        celery_config.base_conf(
            url,
            queue=settings.webhook_queue,
            task_prefix="webhooks",
            connection_timeout_seconds=settings.webhook_publish_timeout_seconds,
            transport=_transport_options(url, settings),
        )
    )
    return app


# --- the dispatcher ---


class WebhookDispatcher:
    """Turns a published signal event (the prediction JSON) into delivery tasks for its series' webhooks."""

    def __init__(self, pool: asyncpg.Pool, settings: PredictorSettings) -> None:
        self.pool = pool
        self.settings = settings
        self._celery: Celery | None = None
        self._celery_lock = threading.Lock()
        self.published = 0  # tasks sent (the tests read these two)
        self.publish_errors = 0
        self.last_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _app(self) -> Celery:
        with self._celery_lock:
            if self._celery is None:
                self._celery = create_celery(self.settings)
            return self._celery

    def _send(self, messages: list[list[object]]) -> None:
        app = self._app()
        for args in messages:
            app.send_task(DELIVER_TASK, args=args, queue=self.settings.webhook_queue)

    async def dispatch(self, event: bytes | str) -> int:
        """Enqueue one delivery per active webhook of the event's series, once across every replica.

        Returns how many this call enqueued (0 when no webhook subscribes, or another replica claimed the
        event first). The body each receiver gets is `event`, byte for byte.
        """
        body = event.encode() if isinstance(event, str) else event
        try:
            data = orjson.loads(body)
            prediction_id = uuid.UUID(str(data["prediction_id"]))
            symbol, timeframe = str(data["symbol"]), str(data["timeframe"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("not a signal event; no webhook gets it", extra={"error": f"{type(exc).__name__}: {exc}"})
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            ids = await repo.subscribed(conn, f"{symbol}:{timeframe}")
            if not ids or not await repo.claim_dispatch(conn, prediction_id, symbol, timeframe, len(ids)):
                return 0
        # After the commit: a worker that runs the task at once finds the claim (and the webhook) in place.
        text = body.decode()
        messages: list[list[object]] = [[webhook_id, str(prediction_id), text] for webhook_id in ids]
        try:
            with anyio.fail_after(self.settings.webhook_publish_timeout_seconds * 2):
                await anyio.to_thread.run_sync(functools.partial(self._send, messages), abandon_on_cancel=True)
        except Exception as exc:
            # The claim stays: no other replica re-sends the event. Logged at ERROR for the operator.
            self.publish_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "could not enqueue webhook deliveries",
                extra={"prediction_id": str(prediction_id), "webhooks": ids, "error": self.last_error},
            )
            return 0
        self.published += len(messages)
        return len(messages)

    async def on_signal(self, event: SignalEvent) -> None:
        """The signal stream's internal callback (`SignalStreams.subscribe_internal`): the dispatch runs in a
        task of its own, so a slow broker never delays the bar closer's next series."""
        task = asyncio.create_task(self._dispatch_logged(event.data), name=f"webhooks {event.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch_logged(self, body: bytes) -> None:
        try:
            await self.dispatch(body)
        except Exception as exc:  # PostgreSQL down, say: logged and counted; the event is not retried
            self.publish_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("webhook dispatch failed", extra={"error": self.last_error})

    async def drain(self) -> None:
        """Wait for the dispatches under way (tests; the lifespan's end)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()


Subscribe = Callable[[Callable[[SignalEvent], Awaitable[None]]], Callable[[], None]]


@contextlib.asynccontextmanager
async def webhooks_running(
    app: FastAPI, pool: asyncpg.Pool, settings: PredictorSettings, subscribe: Subscribe | None = None
) -> AsyncIterator[WebhookDispatcher]:
    """The lifespan's part for webhooks: the dispatcher on `app.state.webhooks`, fed by `subscribe` (the
    signal stream's `subscribe_internal`), and the hourly prune of old attempts and claims."""
    dispatcher = app.state.webhooks = WebhookDispatcher(pool, settings)
    unsubscribe = subscribe(dispatcher.on_signal) if subscribe is not None else None

    async def prune() -> None:
        deliveries, dispatches = await repo.prune(pool, settings.webhook_log_retention_days)
        if deliveries or dispatches:
            log.info("pruned webhook history", extra={"deliveries": deliveries, "dispatches": dispatches})

    try:
        async with periodic("webhook history prune", PRUNE_INTERVAL_SECONDS, prune):
            yield dispatcher
    finally:
        if unsubscribe is not None:
            unsubscribe()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.webhook_publish_timeout_seconds * 2):
                await dispatcher.drain()
        dispatcher.close()


def dispatcher_of(app: Any) -> WebhookDispatcher:
    dispatcher = getattr(app.state, "webhooks", None)
    if not isinstance(dispatcher, WebhookDispatcher):
        raise RuntimeError("app.state.webhooks is not set: the predictor's lifespan has not run")
    return dispatcher


async def _get_dispatcher(request: Request) -> WebhookDispatcher:
    return dispatcher_of(request.app)


DispatcherDep = Annotated[WebhookDispatcher, Depends(_get_dispatcher)]


# --- the API ---


class WebhookIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"url": "https://hooks.example.com/aicash", "series": ["EURUSD:H1"]}},
    )

    url: str = Field(max_length=2048, description="http:// or https:// URL that receives a POST per signal")
    series: list[str] = Field(
        min_length=1, max_length=MAX_SERIES, description='served series, "SYMBOL:TIMEFRAME", e.g. "EURUSD:H1"'
    )
    secret: str | None = Field(
        default=None,
        min_length=16,
        max_length=256,
        description="HMAC-SHA256 key of X-AICash-Signature (at least 16 characters); leave out to have one "
        "generated and returned once in the response",
    )


class WebhookCreated(Webhook):
    secret: str | None = Field(
        description="the generated secret: shown only in this response, only when the request sent none"
    )


class WebhookPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"paused": False}})

    paused: bool = Field(description="false unpauses (and resets the failure count); true pauses")


def _parse_series(request: Request, raw: list[str]) -> list[str]:
    served = {f"{s}:{t}" for s, t in predictor_of(request.app).models.models}
    out: list[str] = []
    for entry in raw:
        symbol, sep, timeframe = entry.partition(":")
        if not sep:
            raise ValidationFailed(f'series {entry!r} is malformed: write "SYMBOL:TIMEFRAME", e.g. "EURUSD:H1"')
        check_symbol(symbol)
        key = f"{symbol}:{parse_timeframe(timeframe).value}"
        if key not in served:
            shown = ", ".join(sorted(served)[:20]) or "none"
            raise ValidationFailed(f"series {key} is not served (no production model); served series: {shown}")
        if key not in out:
            out.append(key)
    return out


def _webhook_id(webhook_id: str) -> int:
    if not (webhook_id.isascii() and webhook_id.isdigit()) or len(webhook_id) > 18:  # "²".isdigit() is True
        raise ValidationFailed(f"webhook id {webhook_id!r} must be a positive integer (the id POST returned)")
    return int(webhook_id)


router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

# Answer examples of the routes below (the models live in webhook_repository.py).
_WEBHOOK = {
    "id": 3,
    "url": "https://hooks.example.com/aicash",
    "series": ["EURUSD:H1"],
    "created_by": "admin-1",
    "created_at": "2024-03-01T10:00:00Z",
    "updated_at": "2024-03-01T10:00:00Z",
    "paused": False,
    "paused_reason": None,
    "paused_at": None,
    "failures": 0,
    "last_success_at": "2024-03-01T11:00:01Z",
    "last_failure_at": None,
}
_DELIVERY = {
    "id": 88,
    "webhook_id": 3,
    "prediction_id": "0192f3a4-5b6c-7d8e-9f00-112233445566",
    "attempt": 1,
    "status": "delivered",
    "http_status": 200,
    "error": None,
    "duration_ms": 41.7,
    "at": "2024-03-01T11:00:01Z",
}


def _example(status: int, value: object) -> dict[int | str, dict[str, Any]]:
    return {status: {"content": {"application/json": {"example": value}}}}


@router.post(
    "",
    summary="Create a webhook",
    status_code=201,
    response_model=WebhookCreated,
    responses={
        **_example(201, {**_WEBHOOK, "last_success_at": None, "secret": "q3JkA0f8Qz7c1VbN9xWm2LpT5rYs6UeH4gDiKoZa_Ew"}),
        **error_responses(401, 403, 422, 503),
    },
)
async def create_webhook(body: WebhookIn, request: Request, principal: AdminKey) -> WebhookCreated:
    """Subscribe a URL to the bar-close signals of some series (role admin).

    Each signal is POSTed as the same JSON as a prediction, signed with `X-AICash-Signature:
    sha256=<hex HMAC-SHA256(secret, body)>`, with `X-AICash-Timestamp` and `X-AICash-Event-Id` (the
    prediction id). 422 for a URL that is not http(s), a host that does not resolve or resolves to a loopback,
    private, link-local, multicast or reserved address (unless the operator allows private targets), or a
    series that is not served.
    """
    settings: PredictorSettings = request.app.state.settings
    series = _parse_series(request, body.series)
    await check_target(
        body.url,
        allow_private=settings.webhook_allow_private_targets,
        timeout_seconds=settings.webhook_resolve_timeout_seconds,
    )
    generated = body.secret is None
    secret = secrets.token_urlsafe(32) if body.secret is None else body.secret
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        hook = await repo.create_webhook(conn, body.url, series, secret, principal.key_id)
        await audit.record(
            conn,
            actor=principal.key_id,
            action="webhook.create",
            target=f"webhook:{hook.id}",
            after={"url": hook.url, "series": hook.series},
        )
    return WebhookCreated(**hook.model_dump(), secret=secret if generated else None)


@router.get(
    "",
    summary="List webhooks",
    response_model=list[Webhook],
    responses={**_example(200, [_WEBHOOK]), **error_responses(401, 403, 503)},
)
async def list_webhooks(request: Request, _: AdminKey) -> list[Webhook]:
    """Every webhook with its state (paused, reason, consecutive failures); secrets are never returned
    (role admin)."""
    return await repo.list_webhooks(request.app.state.pool)


@router.get(
    "/{webhook_id}",
    summary="A webhook",
    response_model=Webhook,
    responses={**_example(200, _WEBHOOK), **error_responses(401, 403, 404, 422, 503)},
    openapi_extra=handler_checked(webhook_id=WEBHOOK_ID_SCHEMA),
)
async def get_webhook(webhook_id: str, request: Request, _: AdminKey) -> Webhook:
    """One webhook (role admin); 404 when there is none with this id."""
    hook = await repo.get_webhook(request.app.state.pool, _webhook_id(webhook_id))
    if hook is None:
        raise NotFoundError(f"no webhook {webhook_id}; GET /v1/webhooks lists them")
    return hook


@router.get(
    "/{webhook_id}/deliveries",
    summary="A webhook's delivery attempts",
    response_model=list[Delivery],
    responses={**_example(200, [_DELIVERY]), **error_responses(401, 403, 404, 422, 503)},
    openapi_extra=handler_checked(webhook_id=WEBHOOK_ID_SCHEMA),
)
async def list_deliveries(
    webhook_id: str,
    request: Request,
    _: AdminKey,
    limit: Annotated[int, Query(ge=1, le=1000, description="newest attempts first")] = 100,
) -> list[Delivery]:
    """The webhook's delivery attempts, newest first: one row per try, with the HTTP status or the error
    (role admin)."""
    wid = _webhook_id(webhook_id)
    pool: asyncpg.Pool = request.app.state.pool
    if await repo.get_webhook(pool, wid) is None:
        raise NotFoundError(f"no webhook {webhook_id}; GET /v1/webhooks lists them")
    return await repo.list_deliveries(pool, wid, limit)


@router.patch(
    "/{webhook_id}",
    summary="Pause or unpause a webhook",
    response_model=Webhook,
    responses={**_example(200, _WEBHOOK), **error_responses(401, 403, 404, 422, 503)},
    openapi_extra=handler_checked(webhook_id=WEBHOOK_ID_SCHEMA),
)
async def patch_webhook(webhook_id: str, body: WebhookPatch, request: Request, principal: AdminKey) -> Webhook:
    """Pause or unpause a webhook (role admin). Unpausing clears the reason and the failure count; events
    published while it was paused are not sent afterwards."""
    wid = _webhook_id(webhook_id)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        before = await repo.get_webhook(conn, wid)
        if before is None:
            raise NotFoundError(f"no webhook {webhook_id}; GET /v1/webhooks lists them")
        reason = f"paused by {principal.key_id}" if body.paused else None
        hook = await repo.set_paused(conn, wid, body.paused, reason)
        assert hook is not None
        await audit.record(
            conn,
            actor=principal.key_id,
            action="webhook.pause" if body.paused else "webhook.unpause",
            target=f"webhook:{wid}",
            before={"paused": before.paused, "paused_reason": before.paused_reason, "failures": before.failures},
            after={"paused": hook.paused},
        )
    return hook


@router.delete(
    "/{webhook_id}",
    summary="Delete a webhook",
    status_code=204,
    responses=error_responses(401, 403, 404, 422, 503),
    openapi_extra=handler_checked(webhook_id=WEBHOOK_ID_SCHEMA),
)
async def delete_webhook(webhook_id: str, request: Request, principal: AdminKey) -> Response:
    """Delete a webhook and its delivery history (role admin); retries still queued for it are dropped."""
    wid = _webhook_id(webhook_id)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        hook = await repo.delete_webhook(conn, wid)
        if hook is None:
            raise NotFoundError(f"no webhook {webhook_id}; GET /v1/webhooks lists them")
        await audit.record(
            conn,
            actor=principal.key_id,
            action="webhook.delete",
            target=f"webhook:{wid}",
            before={"url": hook.url, "series": hook.series},
        )
    return Response(status_code=204)
