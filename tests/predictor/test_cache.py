"""The in-process L1 in front of Redis: same keys and lifetimes, bounded."""

from __future__ import annotations

import time

from services.predictor.cache import PredictionCache


async def test_l1_serves_until_the_entry_expires() -> None:
    cache = PredictionCache(None, 1.0, l1_entries=10)  # no Redis: only the L1 can answer
    assert await cache.lookup("k") is None
    await cache.store("k", {"signal": "BUY", "expires_at": time.time() + 60}, 60)
    assert (await cache.lookup("k") or {}).get("signal") == "BUY"
    assert cache.l1_hits == 1
    await cache.store("old", {"signal": "SELL", "expires_at": time.time() - 1}, 1)
    assert await cache.lookup("old") is None


async def test_l1_is_bounded_oldest_out() -> None:
    cache = PredictionCache(None, 1.0, l1_entries=3)
    for i in range(5):
        await cache.store(f"k{i}", {"i": i, "expires_at": time.time() + 60}, 60)
    assert [await cache.lookup(f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]


async def test_l1_off() -> None:
    cache = PredictionCache(None, 1.0, l1_entries=0)
    await cache.store("k", {"expires_at": time.time() + 60}, 60)
    assert await cache.lookup("k") is None
