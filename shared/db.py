"""asyncpg pool, created in a service's lifespan and closed there."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from shared.settings import Settings


class DatabaseNotConfigured(RuntimeError):
    pass


def require_database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise DatabaseNotConfigured(
            "DATABASE_URL is not set; `make up` starts an embedded PostgreSQL and sets it for you"
        )
    return settings.database_url


async def create_pool(settings: Settings, application_name: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        require_database_url(settings),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        command_timeout=settings.db_command_timeout_seconds,
        timeout=5.0,
        server_settings={"application_name": application_name},
    )
    assert pool is not None
    return pool


async def with_retry[T](fn: Callable[[], Awaitable[T]]) -> T:
    """Run `fn` and retry it once if PostgreSQL dropped the connection.

    After a server restart the pool's first use of each stale connection raises
    ConnectionDoesNotExistError; the pool discards it and the next try gets a fresh one (FIELD-NOTES).
    """
    try:
        return await fn()
    except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError):
        return await fn()
