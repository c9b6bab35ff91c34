"""Building blocks every service's `create_app()` uses: request ids, errors, auth, metrics, health."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi_offline import FastAPIOffline
from prometheus_client.registry import Collector
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import Authenticator, document_roles
from shared.background import cancel_and_wait
from shared.errors import PayloadTooLarge, document_errors, install_error_handlers
from shared.health import ReadinessChecks, install_health
from shared.logging import request_id_var
from shared.metrics import HttpMetrics, install_metrics
from shared.settings import Settings

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger(__name__)
# One line per request (set ACCESS_LOG=false, or the logger "aicash.access" above INFO, to silence it).
access_log = logging.getLogger("aicash.access")
_QUIET_PATHS = frozenset({"/health", "/health/ready", "/metrics"})


# 50,000 bars of JSON with ISO timestamps are about 6 MB; leave room for long numbers and whitespace.
MAX_BODY_BYTES = 16 * 1024 * 1024


async def read_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes; the limit is {max_bytes}")
    # The ASGI messages read directly: Request.stream()'s async generator costs more than a small body.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body over {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes` on every route of the service, whether or not the route reads
    its body itself (`read_body`) or through FastAPI: the service refuses it even without nginx in front.

    A declared Content-Length over the limit is refused before a byte of the body is read (the server never
    delivers more than it declares). A body sent without one (chunked) is read here, at most `max_bytes`, and
    handed on whole; once over, it is refused. Not FastAPI's own `max_body_size`: that answers a declared
    length with plain text and a chunked one with 400 "error parsing the body" when the route parses JSON,
    instead of this API's `{"error", "detail"}`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_bytes:
                    await _too_large(send, f"body of {int(value)} bytes; the limit is {self.max_bytes}")
                    return
                await self.app(scope, receive, send)
                return
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _too_large(send, f"body over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(send: Send, detail: str) -> None:
    body = orjson.dumps({"error": PayloadTooLarge.code, "detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def get_pool(request: Request) -> asyncpg.Pool:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a hop per request.
    return request.app.state.pool


PoolDep = Annotated[asyncpg.Pool, Depends(get_pool)]


@contextlib.asynccontextmanager
async def periodic(what: str, interval_s: float, fn: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run `fn` now and then every `interval_s` in the background while the context is open.

    A failure (the database is down, say) is logged in one line and retried on the next tick; readiness is
    where a dependency's state is reported.
    """

    async def loop() -> None:
        while True:
            try:
                await fn()
            except Exception as exc:  # logged, retried next tick
                log.warning("could not refresh %s: %s: %s", what, type(exc).__name__, exc)
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop(), name=f"refresh {what}")
    try:
        yield
    finally:
        await cancel_and_wait([task])


_RID_PREFIX = secrets.token_hex(10)
_rid_counter = itertools.count(1)


def _next_request_id() -> str:
    # Unique per process start (random prefix) and request (counter): a uuid4 per request is a system call
    # for randomness that request ids do not need.
    return f"{_RID_PREFIX}{next(_rid_counter):012x}"


class RequestIdMiddleware:
    """Takes `X-Request-ID` (or makes one), puts it in the log context and returns it in the response; logs
    one JSON line per request; turns an unexpected exception into a JSON 500 that carries the request id
    (the exception is logged with its traceback, as JSON).

    With `metrics`, the same layer records the request's `http_requests_total` and
    `http_request_duration_seconds` (shared.metrics.HttpMetrics): one ASGI layer for both instead of two.

    Pure ASGI rather than BaseHTTPMiddleware: it sits on every request, and the latter costs throughput.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID_RE.match(candidate):
                    rid = candidate
                break
        rid = rid or _next_request_id()
        token = request_id_var.set(rid)
        raw = rid.encode()
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", raw)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if status:  # the response had started: nothing more can be said to this client
                raise
            body = orjson.dumps({"error": "internal_error", "detail": f"internal error; request id {rid}"})
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.observe(scope, status or 500, elapsed)  # no response sent: counted as a 500
            if access_log.isEnabledFor(logging.INFO) and scope.get("path") not in _QUIET_PATHS:
                access_log.info(
                    "%s %s %d",
                    scope.get("method"),
                    scope.get("path"),
                    status,
                    extra={"status": status, "duration_ms": round(elapsed * 1000, 3)},
                )
            request_id_var.reset(token)


def build_app(
    *,
    title: str,
    description: str,
    settings: Settings,
    lifespan: Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]],
    checks: ReadinessChecks,
    collectors: Iterable[Collector] = (),
    extra_schemas: Iterable[type[BaseModel]] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    # /docs and /redoc load Swagger UI and ReDoc from files this process serves (/static-offline-docs), not a
    # CDN: the docs render on machines without internet access (tests/ui/test_console_browser.py loads them).
    # FastAPI's own OpenTelemetry hooks off: this system exports Prometheus metrics and JSON logs, and with no
    # OpenTelemetry provider set up, FastAPI still asks for one on every request (2.8 us of a cached prediction's
    # ~110; with them off, 0.07 us: benchmarks/bench_stack.py).
    app = FastAPIOffline(
        title=title,
        description=description,
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.auth = Authenticator(settings)
    if not settings.access_log:
        access_log.setLevel(logging.WARNING)
    install_error_handlers(app)
    install_health(app, checks)
    install_metrics(app, collectors)
    # Added first, so it runs inside RequestIdMiddleware: a 413 carries the request id and is logged.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(RequestIdMiddleware, metrics=HttpMetrics())
    _document_raw_bodies(app, list(extra_schemas))
    document_roles(app)
    document_errors(app)
    return app


def add_routes(app: FastAPI, *routers: APIRouter) -> None:
    """Put the routers' routes directly on the app, in order, instead of `include_router`.

    FastAPI >= 0.116 keeps an included router as one nested route, so every request is matched through an
    extra level, and the Prometheus instrumentator flattens the nesting again on every request to name the
    handler. With 13 routes that costs 28 us a request (benchmarks/bench_stack.py). OpenAPI is the same.
    The service's routes go first, in the order given (hot routes first): the docs, health and metrics
    routes that FastAPI and build_app add are rarely called. No two paths overlap, so order changes nothing
    but the cost of matching.
    """
    ours = [route for router in routers for route in router.routes]
    app.router.routes[0:0] = ours


def json_body(model: type[BaseModel], example: Any | None = None) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its own JSON body (for speed) but documents its schema."""
    content: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    if example is not None:
        content["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


def _document_raw_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    if not models:
        return
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
