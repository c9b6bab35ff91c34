"""The prediction log: every served prediction recorded, batched, bounded when the database is down,
pruned after the retention."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import asyncpg
import httpx
import pytest

from services.predictor import repository
from services.predictor.prediction_log import LogRecord, PredictionLog
from tests.support.predictor import SYMBOL


async def _row(database_url: str, pid: str, timeout_s: float = 10.0) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            row = await conn.fetchrow(
                "SELECT p.*, w.features, w.feature_shape FROM predictions p "
                "JOIN prediction_windows w USING (window_hash) WHERE p.id = $1::uuid",
                pid,
            )
            if row is not None:
                return row
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError(f"prediction {pid} was not written within {timeout_s} s")


async def test_every_served_prediction_is_recorded(client: httpx.AsyncClient, database_url: str) -> None:
    body = {"symbol": SYMBOL, "timeframe": "H1", "user_id": "alice@example.com"}
    first = (await client.post("/v1/predictions", json=body, headers={"Cache-Control": "no-cache"})).json()
    second = (await client.post("/v1/predictions", json=body)).json()
    assert second["cached"] is True
    for served in (first, second):
        row = await _row(database_url, served["prediction_id"])
        assert row["cached"] is served["cached"]
        assert row["signal"] == served["signal"] and row["model_version"] == served["model_version"]
        assert row["user_hash"] == hashlib.sha256(b"test-salt" + b"alice@example.com").hexdigest()
        assert list(row["feature_shape"]) == [20, 17] and len(row["features"]) == 340
        assert row["probabilities"][2] == pytest.approx(served["probabilities"]["BUY"], abs=1e-6)
    rows = [await _row(database_url, s["prediction_id"]) for s in (first, second)]
    assert rows[0]["window_hash"] == rows[1]["window_hash"]
    assert rows[0]["features"] == rows[1]["features"]


async def test_get_prediction_returns_the_record(client: httpx.AsyncClient) -> None:
    served = (await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1", "user_id": "bob"})).json()
    r = await client.get(f"/v1/predictions/{served['prediction_id']}")  # right away: may still be buffered
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["prediction_id"] == served["prediction_id"]
    assert record["signal"] == served["signal"] and record["bar_ts"].startswith(served["bar_ts"][:19])
    assert len(record["features"]) == 20 and len(record["features"][0]) == 17
    assert record["feature_names"][0] == "rsi_14"
    assert "bob" not in str(record)
    assert (await client.get(f"/v1/predictions/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/v1/predictions/not-a-uuid")).status_code == 404


def _record(created: float, pid: uuid.UUID | None = None, window_hash: str = "h" * 64) -> LogRecord:
    import base64

    import numpy as np

    window = base64.b64encode(np.zeros((2, 3), dtype=np.float32).tobytes()).decode()
    return LogRecord(
        pid or uuid.uuid4(),
        created,
        "LOGT",
        "H1",
        "2024-01-01T00:00:00Z",
        "v1",
        "production",
        None,
        window_hash,
        window,
        [2, 3],
        [0.2, 0.3, 0.5],
        "BUY",
        0.5,
        "BUY",
        False,
        None,
    )


async def test_database_down_buffers_bounded_and_counts_drops(database_url: str) -> None:
    dead = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    await dead.close()  # every write now fails, as with PostgreSQL down
    plog = PredictionLog(
        dead, flush_seconds=0.01, batch_rows=2, buffer_rows=5, retention_days=0, prune_interval_seconds=3600
    )
    records = [_record(time.time()) for _ in range(8)]
    for rec in records:
        plog.append(rec)
    with pytest.raises(asyncpg.InterfaceError):
        await plog.flush()
    assert len(plog.buffer) == 5 and plog.dropped == 3
    # PostgreSQL back: the newest five are written.
    plog.pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        assert await plog.flush() == 5
        ids = [r.prediction_id for r in records]
        conn = await asyncpg.connect(database_url)
        try:
            kept = await conn.fetchval("SELECT count(*) FROM predictions WHERE id = ANY($1::uuid[])", ids)
        finally:
            await conn.close()
        assert kept == 5
    finally:
        await plog.pool.close()


async def test_retention_prune_deletes_old_rows_only(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        from services.predictor.prediction_log import to_row

        old, new = uuid.uuid4(), uuid.uuid4()
        await repository.copy_predictions(
            pool, [to_row(_record(time.time() - 100 * 86400, old)), to_row(_record(time.time(), new))]
        )
        plog = PredictionLog(
            pool, flush_seconds=1, batch_rows=10, buffer_rows=10, retention_days=90, prune_interval_seconds=3600
        )
        assert await plog.prune() >= 1
        assert await pool.fetchval("SELECT count(*) FROM predictions WHERE id = $1", old) == 0
        assert await pool.fetchval("SELECT count(*) FROM predictions WHERE id = $1", new) == 1
    finally:
        await pool.close()


async def test_each_window_is_stored_once(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        plog = PredictionLog(
            pool, flush_seconds=1, batch_rows=100, buffer_rows=100, retention_days=0, prune_interval_seconds=3600
        )
        a, b = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
        # One batch: three predictions on window a, one on b; then a later batch on a again.
        for h in (a, a, b, a):
            plog.append(_record(time.time(), window_hash=h))
        assert await plog.flush() == 4
        assert plog.windows_written == 2
        plog.append(_record(time.time(), window_hash=a))
        assert await plog.flush() == 1
        assert plog.windows_written == 2  # remembered as written: not sent again
        # Another worker (or a restart) that does not remember it: the database keeps one row.
        other = PredictionLog(
            pool, flush_seconds=1, batch_rows=100, buffer_rows=100, retention_days=0, prune_interval_seconds=3600
        )
        other.append(_record(time.time(), window_hash=a))
        assert await other.flush() == 1
        windows = await pool.fetchval("SELECT count(*) FROM prediction_windows WHERE window_hash = ANY($1)", [a, b])
        uses = await pool.fetchval("SELECT count(*) FROM predictions WHERE window_hash = $1", a)
        assert windows == 2 and uses == 5
    finally:
        await pool.close()


async def test_retention_prune_deletes_windows_no_prediction_references(database_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from services.predictor.prediction_log import to_row

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        old_unused, old_used, new_unused = (uuid.uuid4().hex * 2 for _ in range(3))
        long_ago = datetime.now(UTC) - timedelta(days=100)
        async with pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO prediction_windows (window_hash, created_at, features, feature_shape) "
                "VALUES ($1, $2, '{0,0}', '{1,2}')",
                [(old_unused, long_ago), (old_used, long_ago), (new_unused, datetime.now(UTC))],
            )
        # A recent prediction still references the old window old_used.
        await repository.copy_predictions(pool, [to_row(_record(time.time(), window_hash=old_used))])
        plog = PredictionLog(
            pool, flush_seconds=1, batch_rows=10, buffer_rows=10, retention_days=90, prune_interval_seconds=3600
        )
        await plog.prune()
        left = await pool.fetch(
            "SELECT window_hash FROM prediction_windows WHERE window_hash = ANY($1)", [old_unused, old_used, new_unused]
        )
        assert {r["window_hash"] for r in left} == {old_used, new_unused}
    finally:
        await pool.close()


async def test_the_binary_encoder_writes_what_asyncpgs_record_copy_writes(database_url: str) -> None:
    """The flush encodes batches itself (`RowEncoder`); the same records through `to_row` and asyncpg's
    `copy_records_to_table` must give the same rows, every column, NULLs, float4 rounding and microseconds
    included; and a record reads the same before its flush (`pending`, from `to_row`) as after."""
    from services.predictor.prediction_log import RowEncoder, to_row

    base = _record(1_767_225_600.123456)
    variants = [
        base,
        base._replace(created=1_767_225_600.7887235, user_hash="u" * 64, request_id="req-1", cached=True),
        base._replace(created=1_767_225_600.9999996, variant="candidate", consensus_signal="HOLD"),
        base._replace(symbol="EUR.USD-1", timeframe="M15", bar_ts="2025-06-30T23:45:00Z", model_version="v10+é"),
        base._replace(probabilities=[1 / 3, 1 / 7, 1 - 1 / 3 - 1 / 7], confidence=0.1234567, signal="SELL"),
        base._replace(created=time.time(), request_id="ünïcode", consensus_signal=None),  # type: ignore[arg-type]
    ]
    encoder = RowEncoder()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        by_records = [r._replace(prediction_id=uuid.uuid4()) for r in variants]
        by_encoder = [r._replace(prediction_id=uuid.uuid4()) for r in variants * 2]  # the second time from the cache
        await repository.copy_predictions(pool, [to_row(r) for r in by_records])
        await repository.copy_predictions(pool, encoder.encode(by_encoder))
        columns = ", ".join(c for c in repository.LOG_COLUMNS if c != "id")

        async def read(r: LogRecord) -> tuple[object, ...]:
            row = await pool.fetchrow(f"SELECT {columns} FROM predictions WHERE id = $1", r.prediction_id)
            assert row is not None
            return tuple(row)

        for k, expected in enumerate(by_records):
            want = await read(expected)
            assert want[0] == to_row(expected)[1]  # created_at as `pending` shows it before the flush
            for got in (by_encoder[k], by_encoder[k + len(variants)]):
                assert await read(got) == want
    finally:
        await pool.close()
