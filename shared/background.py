"""Background asyncio tasks of a service's lifespan (listeners, periodic loops): how they end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel every task (None: never started), then wait for each to end; their cancellation is not re-raised."""
    started = [t for t in tasks if t is not None]
    for task in started:
        task.cancel()
    for task in started:
        with contextlib.suppress(asyncio.CancelledError):
            await task
