"""In-process HTTP clients for the services' FastAPI apps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from tests.support.keys import ADMIN_KEY


async def asgi_client(app: FastAPI, key: str | None = ADMIN_KEY) -> AsyncIterator[httpx.AsyncClient]:
    """Run `app`'s lifespan and yield a client that sends `key` (none when `key` is None) as X-API-Key."""
    headers = {"X-API-Key": key} if key else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client
