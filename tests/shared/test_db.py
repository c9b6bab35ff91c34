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
