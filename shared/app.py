"""Building blocks every service's `create_app()` uses: request ids, errors, auth, metrics, health."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from prometheus_client.registry import Collector
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import Authenticator
from shared.errors import install_error_handlers
from shared.health import ReadinessChecks, install_health
from shared.logging import request_id_var
from shared.metrics import install_metrics
from shared.settings import Settings

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Takes `X-Request-ID` (or makes one), puts it in the log context and returns it in the response.

    Pure ASGI rather than BaseHTTPMiddleware: it sits on every request, and the latter costs throughput.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
        rid = rid or uuid.uuid4().hex
        token = request_id_var.set(rid)
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", raw)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def build_app(
    *,
    title: str,
    description: str,
    settings: Settings,
    lifespan: Any,
    checks: ReadinessChecks,
    collectors: Iterable[Collector] = (),
    extra_schemas: Iterable[type[BaseModel]] = (),
) -> FastAPI:
    app = FastAPI(title=title, description=description, version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.auth = Authenticator(settings)
    install_error_handlers(app)
    install_health(app, checks)
    install_metrics(app, collectors)
    app.add_middleware(RequestIdMiddleware)
    _document_raw_bodies(app, list(extra_schemas))
    return app


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
