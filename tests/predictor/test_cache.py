"""The in-process L1 in front of Redis: same keys and lifetimes, bounded; entries survive the Redis round trip."""

from __future__ import annotations

import time

import orjson
import redis.asyncio as aioredis

from services.predictor.cache import CacheEntry, PredictionCache


def entry(signal: str = "BUY", expires_at: float | None = None) -> CacheEntry:
    return CacheEntry(
        symbol="CACHE1",
        timeframe="H1",
        signal=signal,
        confidence=0.5,
        probabilities={"SELL": 0.2, "HOLD": 0.3, "BUY": 0.5},
        model_version="v1",
        timeframes={"H1": {"status": "ok", "signal": signal, "confidence": 0.5, "model_version": "v1"}},
        consensus={
            "signal": signal,
            "rule": "confidence_weighted_vote",
            "votes": {"BUY": 0.5, "SELL": 0.0, "HOLD": 0.0},
            "strength": 1.0,
            "agreement": 1.0,
            "timeframes_used": ["H1"],
        },
        indicator_score=0.25,
        weights_version="equal-v1",
        risk={"side": "long", "position_fraction": 0.01},
        bar_ts="2024-01-01T00:00:00Z",
        generated_at="2024-01-01T00:00:01Z",
        window_hash="h" * 64,
        window_shape=[2, 3],
        window_b64="",
        expires_at=time.time() + 60 if expires_at is None else expires_at,
    )


async def test_l1_serves_until_the_entry_expires() -> None:
    cache = PredictionCache(None, 1.0, l1_entries=10)  # no Redis: only the L1 can answer
    assert await cache.lookup("k") is None
    await cache.store("k", entry("BUY"), 60)
    assert (hit := await cache.lookup("k")) is not None and hit.signal == "BUY"
    assert cache.l1_hits == 1
    await cache.store("old", entry("SELL", expires_at=time.time() - 1), 1)
    assert await cache.lookup("old") is None


async def test_l1_is_bounded_oldest_out() -> None:
    cache = PredictionCache(None, 1.0, l1_entries=3)
    for i in range(5):
        await cache.store(f"k{i}", entry(), 60)
    assert [await cache.lookup(f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]


async def test_l1_off() -> None:
    cache = PredictionCache(None, 1.0, l1_entries=0)
    await cache.store("k", entry(), 60)
    assert await cache.lookup("k") is None


async def test_an_entry_read_back_from_redis_renders_the_same_response(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        writer, reader = PredictionCache(client, 1.0, l1_entries=0), PredictionCache(client, 1.0, l1_entries=0)
        original = entry("SELL")
        await writer.store("pred:test:roundtrip", original, 60)
        back = await reader.lookup("pred:test:roundtrip")
        assert back == original
        assert back is not None and back.rendered == original.rendered
        assert orjson.loads(back.rendered)["signal"] == "SELL"
        # What another writer left under a key is a miss, not a failed prediction.
        await client.set("pred:test:foreign", b'{"signal": "BUY"}', ex=60)
        assert await reader.lookup("pred:test:foreign") is None
    finally:
        await client.delete("pred:test:roundtrip", "pred:test:foreign")
        await client.aclose()
