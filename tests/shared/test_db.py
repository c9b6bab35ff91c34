"""The shared LISTEN connection: notifications arrive, a dropped connection is reported and can reopen."""

from __future__ import annotations

import asyncio

import asyncpg

from shared.db import PgListener


async def test_listener_delivers_notifications_and_reports_a_lost_connection(database_url: str) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    lost = asyncio.Event()
    listener = PgListener(database_url, "test_channel", "aicash-test-listen", got.put_nowait, lost.set)
    other = await asyncpg.connect(database_url)
    try:
        await listener.connect()
        assert listener.connected
        await other.execute("SELECT pg_notify('test_channel', 'hello')")
        assert await asyncio.wait_for(got.get(), 5) == "hello"

        # the server drops the listening backend: the owner hears of it and can reconnect
        await other.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'aicash-test-listen'"
        )
        await asyncio.wait_for(lost.wait(), 5)
        await listener.connect()
        await other.execute("SELECT pg_notify('test_channel', 'again')")
        assert await asyncio.wait_for(got.get(), 5) == "again"
    finally:
        await listener.close()
        await other.close()
    assert not listener.connected


def test_migrations_run_on_a_url_with_libpq_sslmode(server_url: str) -> None:
    """Hosted PostgreSQL URLs carry `?sslmode=require`; `aicash db upgrade` (SQLAlchemy's asyncpg dialect)
    raised TypeError on it. `prefer` here: the local server has no TLS, so the connection falls back to plain."""
    from shared.local_services import scratch_database
    from shared.migrate import sqlalchemy_url, upgrade

    assert sqlalchemy_url("postgresql://u:p@db.example.com:5432/postgres?sslmode=require&application_name=x") == (
        "postgresql+asyncpg://u:p@db.example.com:5432/postgres?ssl=require&application_name=x"
    )
    with scratch_database(server_url, "aicash_sslmode") as url:
        upgrade(url + "?sslmode=prefer")  # already at head: connects, reads the revision, changes nothing
