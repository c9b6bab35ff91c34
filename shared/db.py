"""asyncpg pool, created in a service's lifespan and closed there."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import asyncpg

from shared.settings import Settings


class DatabaseNotConfigured(RuntimeError):
    pass


# PostgreSQL unreachable, restarting or the connection lost under a request: the database being away, not the
# request being bad, so every service answers 503 (shared/errors.py's handler, and the routes that say which
# dependency). A server shutting down ends the sessions with AdminShutdown (57P01, operator intervention) while
# their queries run, refuses new ones with CannotConnectNow (57P03) and a connection broken under the client
# raises InternalClientError. The global handler listed only some of these: CI saw one 500 in the PostgreSQL
# restart case of tests/predictor/test_process_faults.py (its traceback was not kept; that test now prints the
# server log of such a request).
DATABASE_DOWN: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def require_database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise DatabaseNotConfigured(
            "DATABASE_URL is not set; `make up` starts an embedded PostgreSQL and sets it for you"
        )
    return settings.database_url


async def reset_or_drop(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection (asyncpg's own reset query) that drops, rather than raises for,
    a connection the server has ended.

    After PostgreSQL ends the session (`pg_ctl stop -m fast`, a failover) the reset query can fail, e.g. with
    InternalClientError "cannot switch to state 15; another operation (2) is in progress" (asyncpg 0.32, seen in
    tests/predictor/test_process_faults.py). asyncpg then terminates the connection and raises out of
    `async with pool.acquire()`, after the caller's transaction committed: an outcome that was stored answered
    500. The connection is terminated here instead; the pool opens a new one on the next acquire.
    """
    query = conn.get_reset_query()
    if not query:
        return
    try:
        await conn.execute(query)
    except Exception:  # whatever failed, the connection is not reused; the caller's work is done
        conn.terminate()


async def create_pool(settings: Settings, application_name: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        require_database_url(settings),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        command_timeout=settings.db_command_timeout_seconds,
        timeout=5.0,
        server_settings={"application_name": application_name},
        reset=reset_or_drop,
    )
    assert pool is not None
    return pool


async def with_retry[T](fn: Callable[[], Awaitable[T]]) -> T:
    """Run `fn` and retry it once if PostgreSQL dropped the connection.

    After a server restart the pool's first use of each stale connection raises
    ConnectionDoesNotExistError; the pool discards it and the next try gets a fresh one (seen with asyncpg
    0.32: the first query after a PostgreSQL restart failed so, the next one succeeded).
    """
    try:
        return await fn()
    except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError):
        return await fn()


class PgListener:
    """A dedicated connection that LISTENs on one channel, for caches that PostgreSQL NOTIFYs invalidate.

    `connect()` (re)opens it; `on_lost` runs when the server drops it, so the owner can reconnect and
    re-read whatever changed while nobody listened. The owner keeps its own polling fallback.
    """

    def __init__(
        self,
        database_url: str,
        channel: str,
        application_name: str,
        on_notify: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.database_url = database_url
        self.channel = channel
        self.application_name = application_name
        self.on_notify = on_notify
        self.on_lost = on_lost
        self._conn: asyncpg.Connection | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        """Open the connection and LISTEN; raises when PostgreSQL cannot be reached."""
        await self.close()
        conn = await asyncpg.connect(
            self.database_url, timeout=5, server_settings={"application_name": self.application_name}
        )
        await conn.add_listener(self.channel, lambda _c, _pid, _ch, payload: self.on_notify(payload))
        conn.add_termination_listener(lambda _c: self.on_lost())
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
