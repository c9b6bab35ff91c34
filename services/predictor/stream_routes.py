"""GET /v1/signals/stream: bar-close signals as Server-Sent Events (services/predictor/streaming.py)."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import asyncpg
import orjson
from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from services.predictor.deps import PredictorDep, ReadKey
from services.predictor.schemas import SERIES_LIST_SCHEMA
from services.predictor.streaming import Notice, SignalEvent, SignalHub, SignalStreams, Subscriber, series_name
from shared.errors import ServiceUnavailable, ValidationFailed, error_responses, handler_checked
from shared.timeframes import check_symbol, parse_timeframe

log = logging.getLogger("predictor.streaming")
stream_router = APIRouter()

# A cut subscriber gets this long to take its `error` event before the connection is closed under it.
_CUT_GRACE_SECONDS = 1.0
# The reconnect delay the stream asks of EventSource clients (ms).
_RETRY_MS = 2_000
# Ids a connection remembers to skip duplicates. The live events a backlog may also hold are those published
# while it was read, i.e. its newest: the last 512 ids sent cover them unless 512 events came in that moment.
_SENT_IDS = 512


def streams_of(request: Request) -> SignalStreams:
    streams = getattr(request.app.state, "streams", None)
    if not isinstance(streams, SignalStreams):
        raise ServiceUnavailable("the signal stream is turned off on this predictor (STREAM_ENABLED=false)")
    return streams


def parse_series(raw: str, served: set[tuple[str, str]], limit: int) -> list[str]:
    """`EURUSD:H1,SPX:D1` as series names, each checked and served by a production model."""
    names: list[str] = []
    for part in raw.split(","):
        item = part.strip()
        symbol, sep, timeframe = item.partition(":")
        if not sep or not symbol or not timeframe:
            raise ValidationFailed(f"series {item!r} is malformed: write SYMBOL:TIMEFRAME, e.g. EURUSD:H1")
        try:
            check_symbol(symbol)
            tf = parse_timeframe(timeframe)
        except ValidationFailed as exc:
            raise ValidationFailed(f"series {item!r}: {exc.message}") from None
        if (symbol, tf.value) not in served:
            known = ", ".join(sorted(series_name(s, t) for s, t in served)[:20]) or "none"
            raise ValidationFailed(
                f"series {series_name(symbol, tf.value)} has no production model here; served series: {known}"
            )
        name = series_name(symbol, tf.value)
        if name not in names:
            names.append(name)
    if len(names) > limit:
        raise ValidationFailed(f"{len(names)} series in one stream; the limit is {limit}: open more streams")
    return names


def _last_event_id(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise ValidationFailed(
            f"Last-Event-ID {value!r} is not a prediction id: send the id of the last event received, or no header"
        ) from None


def _json(body: dict[str, Any]) -> str:
    return orjson.dumps(body).decode()


# One event goes to every subscriber of its series: encoded once, not once per connection (the hash of the
# event's fields is computed once per event object too).
@functools.lru_cache(maxsize=1024)
def _signal(event: SignalEvent) -> bytes:
    return ServerSentEvent(data=event.data.decode(), event="signal", id=event.id).encode()


def _notice(notice: Notice) -> ServerSentEvent:
    return ServerSentEvent(data=_json(notice.body), event=notice.event)


async def _events(
    streams: SignalStreams, sub: Subscriber, last_id: str | None, user_id: str | None
) -> AsyncIterator[ServerSentEvent | bytes]:
    hub = streams.hub
    try:
        yield ServerSentEvent(comment="stream open", retry=_RETRY_MS)
        # Ids sent lately: the replayed ones are skipped when they come live too, and so is an event a replica
        # republished to a Redis that restarted empty (no gap, no duplicate).
        sent: dict[str, None] = {}
        if last_id is not None:
            # The subscriber is registered already: whatever is published while the backlog is read from
            # PostgreSQL is queued, and skipped when it comes if the backlog had it.
            try:
                backlog, gap = await hub.backlog(sub.series, last_id)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                yield _notice(
                    Notice(
                        "error",
                        {
                            "reason": "database_unavailable",
                            "detail": f"cannot replay after {last_id}: PostgreSQL is unreachable "
                            f"({type(exc).__name__}); live events follow, reconnect with the same Last-Event-ID "
                            "later for the missed ones",
                        },
                    )
                )
            else:
                if gap:
                    yield _notice(
                        Notice(
                            "error",
                            {
                                "reason": "resume_window_exceeded",
                                "detail": f"event {last_id} is not in the replay window; the events after it that "
                                "are still held follow, older ones are in GET /v1/predictions/{id} only",
                            },
                        )
                    )
                for event in backlog:
                    _remember(sent, event.id)
                    yield _signal(event if user_id is None else await _personal(streams, event, user_id))
        while True:
            item = await sub.next()
            if item is None:
                yield _notice(Notice("error", {"reason": "disconnected", "detail": sub.cut_reason}))
                return
            if isinstance(item, Notice):
                yield _notice(item)
            elif item.id not in sent:
                _remember(sent, item.id)
                yield _signal(item if user_id is None else await _personal(streams, item, user_id))
    finally:
        hub.unsubscribe(sub)


def _remember(sent: dict[str, None], event_id: str) -> None:
    sent[event_id] = None
    if len(sent) > _SENT_IDS:
        del sent[next(iter(sent))]  # the oldest (dicts keep insertion order)


async def _personal(streams: SignalStreams, event: SignalEvent, user_id: str | None) -> SignalEvent:
    if user_id is None:
        return event
    try:
        return await streams.closer.for_user(event, user_id)
    except Exception as exc:  # the shared event still tells the truth about its variant
        log.warning("stream: no per-user signal for %s; sent the shared one", event.series, extra={"error": str(exc)})
        return event


class _SignalStreamResponse(EventSourceResponse):
    """An EventSourceResponse that a full queue can end: when its subscriber is cut, the generator sends the
    reason and ends; if the client reads nothing, so that even that send blocks, the response is cancelled
    after a grace period and the server closes the connection.

    Its sends carry no per-send timeout (sse-starlette's `send_timeout` arms a timer around every send: 15 µs
    of the about 60 µs one delivery costs at 500 subscribers, benchmarks/bench_streaming.py). Instead each
    send marks the subscriber as sending, and the hub's watchdog cuts a subscriber whose send has been
    blocked longer than STREAM_SEND_TIMEOUT_SECONDS."""

    def __init__(
        self, hub: SignalHub, sub: Subscriber, content: AsyncIterator[ServerSentEvent | bytes], **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self._hub = hub
        self._sub = sub

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        sub = self._sub
        sub.sending_since = time.monotonic()
        try:
            await send(message)
        finally:
            sub.sending_since = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await self._sub.cut.wait()
                    await anyio.sleep(_CUT_GRACE_SECONDS)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await super().__call__(scope, receive, send)
                tg.cancel_scope.cancel()
        finally:
            self._hub.unsubscribe(self._sub)


@stream_router.get(
    "/v1/signals/stream",
    summary="Stream signals (Server-Sent Events)",
    tags=["predictions"],
    # Only the OpenAPI document reads it (the handler returns its response): the 200 is text/event-stream.
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`text/event-stream`: `event: signal` (id = prediction id, data = the prediction JSON "
            "of POST /v1/predictions), `event: error` / `event: status` with a JSON reason, keep-alive comments",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'id: 0192f3a4-5b6c-7d8e-9f00-112233445566\nevent: signal\ndata: {"prediction_id": '
                    '"0192f3a4-5b6c-7d8e-9f00-112233445566", "symbol": "EURUSD", "timeframe": "H1", "signal": '
                    '"BUY", "confidence": 0.58, ...}\n\n: ping\n\n',
                }
            },
        },
        **error_responses(401, 403, 422, 503),
    },
    openapi_extra=handler_checked(series=SERIES_LIST_SCHEMA),
)
async def stream_signals(
    request: Request,
    predictor: PredictorDep,
    _: ReadKey,
    series: Annotated[
        str,
        Query(
            description="comma-separated SYMBOL:TIMEFRAME of served series, e.g. EURUSD:H1,SPX:D1",
            examples=["EURUSD:H1,SPX:D1"],
        ),
    ],
    user_id: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=256,
            description="route the signals as the rollout routes this user (production or candidate); without "
            "it, the shared signal of each bar (production unless a rollout serves requests without a user id "
            "from the candidate; `variant` says which)",
        ),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="the id of the last event received: the events after it still in the replay window "
            "(docs/STREAMING.md) come first, then live ones",
        ),
    ] = None,
) -> EventSourceResponse:
    """Signals of the named series as they are computed at each bar close (role read), as Server-Sent Events.

    Each completed bar of a served series yields one `signal` event, computed once across all replicas and
    logged like any prediction. Reconnect with `Last-Event-ID` to get what was missed (bounded window), with
    no duplicate. A subscriber that falls `STREAM_QUEUE_EVENTS` behind gets an `error` event and is
    disconnected; while Redis is down an `error` event says so and the stream stays open. 422 for a malformed
    or unserved series or a bad Last-Event-ID.
    """
    streams = streams_of(request)
    settings = predictor.settings
    names = parse_series(series, set(predictor.models.models), settings.stream_max_series)
    resume = _last_event_id(last_event_id)
    hub = streams.hub
    sub = hub.subscribe(names)
    return _SignalStreamResponse(
        hub,
        sub,
        _events(streams, sub, resume, user_id),
        ping=settings.stream_ping_seconds,
    )
