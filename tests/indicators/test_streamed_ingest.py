"""Streamed ingest (`service.ingest_body`): a large body of new bars in time order is cut into pieces, each checked
and written while PostgreSQL writes the one before. It must store exactly what the whole-body path stores (rows,
float bits, flags, series row, counts), refuse the same batches with the same message, and leave nothing of a
refused one. Pieces are made small here (`STREAM_PIECE_BYTES`) so that bodies of a few hundred bars span many."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import httpx
import orjson
import pytest

from services.indicators import service
from shared.bars import bars_to_rows
from shared.settings import Settings
from shared.timeframes import Timeframe
from tests.data import generate_bars

H1 = Timeframe("H1")
ROW = tuple[int, float, float, float, float, float, int]


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STREAM_PIECE_BYTES", 2048)  # about 14 bars a piece


async def _stored(database_url: str, symbol: str) -> tuple[list[ROW], tuple[int, int] | None]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM ts)::bigint, open, high, low, close, volume, flags FROM bars "
            "WHERE symbol = $1 ORDER BY ts",
            symbol,
        )
        series = await conn.fetchrow(
            "SELECT extract(epoch FROM first_ts)::bigint, extract(epoch FROM last_ts)::bigint FROM series "
            "WHERE symbol = $1",
            symbol,
        )
    finally:
        await conn.close()
    return [tuple(r) for r in rows], (tuple(series) if series else None)  # type: ignore[misc]


async def _post(client: httpx.AsyncClient, symbol: str, rows: list[dict[str, object]]) -> httpx.Response:
    return await client.post(f"/v1/bars/{symbol}/H1", content=orjson.dumps({"bars": rows}))


def _suspicious(n: int, seed: int) -> list[dict[str, object]]:
    """Bars with moves and gaps spread over many pieces (flags must match across piece boundaries)."""
    rows = bars_to_rows(generate_bars("H1", n, seed=seed))
    for k in range(60, n, 45):
        rows[k]["close"] = float(rows[k]["close"]) * 1.15  # type: ignore[arg-type]
        rows[k]["high"] = max(float(rows[k]["high"]), float(rows[k]["close"]))  # type: ignore[arg-type]
    return [r for k, r in enumerate(rows) if k % 97 not in range(8)]  # 8-hour holes


async def test_streamed_and_whole_paths_store_the_same(
    indicators: httpx.AsyncClient, indicators_settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _suspicious(600, seed=41)
    first, rest = rows[:150], rows[150:]
    # The whole-body path: pieces larger than any body here.
    monkeypatch.setattr(service, "STREAM_PIECE_BYTES", 1 << 30)
    whole = [(await _post(indicators, "WHOLE", part)).json() for part in (first, rest)]
    # Streamed: the second batch is flagged against the first, stored, bars.
    monkeypatch.setattr(service, "STREAM_PIECE_BYTES", 2048)
    streamed = [(await _post(indicators, "STREAMED", part)).json() for part in (first, rest)]
    assert streamed == whole
    assert whole[1]["inserted"] == len(rest) and whole[1]["flagged"] >= 5
    assert await _stored(database_url, "STREAMED") == await _stored(database_url, "WHOLE")
    # And these bodies did take the streamed path (None would mean the whole-body path wrote them).
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        for part in (first, rest):
            body = orjson.dumps({"bars": part})
            assert len(service.split_body(body, 2048) or ()) > 5
            done = await service.ingest_body(pool, indicators_settings, "DIRECT", H1, body)
            assert done is not None and done[1] == datetime.fromisoformat(str(part[-1]["ts"])).timestamp()
    finally:
        await pool.close()
    assert await _stored(database_url, "DIRECT") == await _stored(database_url, "WHOLE")


@pytest.mark.usefixtures("small_pieces")
async def test_bars_out_of_order_or_already_stored_take_the_whole_path(
    indicators: httpx.AsyncClient, database_url: str
) -> None:
    rows = bars_to_rows(generate_bars("H1", 300, seed=42))
    swapped = [*rows[:200], rows[201], rows[200], *rows[202:]]  # out of order in one piece only
    r = await _post(indicators, "SWAPPED", swapped)
    assert r.json() == {"inserted": 300, "updated": 0, "flagged": r.json()["flagged"]}
    stored, series = await _stored(database_url, "SWAPPED")
    assert [s[0] for s in stored] == sorted(s[0] for s in stored) and len(stored) == 300
    assert series == (stored[0][0], stored[-1][0])
    # The same bars again, two of them changed: the upsert counts what changed.
    rows[250]["volume"] = float(rows[250]["volume"]) + 1  # type: ignore[arg-type]
    rows[10]["volume"] = float(rows[10]["volume"]) + 1  # type: ignore[arg-type]
    r = await _post(indicators, "SWAPPED", rows)
    assert (r.json()["inserted"], r.json()["updated"]) == (0, 2)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    ("where", "change", "message"),
    [
        (299, {"high": 0.5}, "bar 299: high 0.5 < max(open, close)"),
        (150, {"ts": "2020-01-01T00:30:00Z"}, "bar 150: ts 2020-01-01T00:30:00Z is not aligned to H1"),
        (200, {"volume": -1.0}, "bar 200: volume -1.0 must be >= 0"),
        (250, {"ts": "yesterday"}, "bar 250: ts 'yesterday' is not an ISO 8601 timestamp"),
        (280, {"open": "1.0"}, "bar 280: open must be a number, got str"),
    ],
)
async def test_a_bad_bar_in_a_later_piece_refuses_the_whole_batch(
    indicators: httpx.AsyncClient, database_url: str, where: int, change: dict[str, object], message: str
) -> None:
    rows = bars_to_rows(generate_bars("H1", 300, seed=43))
    rows[where] = {**rows[where], **change}
    symbol = f"BAD{where}"
    r = await _post(indicators, symbol, rows)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert await _stored(database_url, symbol) == ([], None)
    metrics = (await indicators.get("/metrics")).text
    assert f'market_bars_rejected_total{{symbol="{symbol}"}} 300.0' in metrics


@pytest.mark.usefixtures("small_pieces")
async def test_duplicates_too_many_bars_and_broken_json_are_refused(
    indicators: httpx.AsyncClient, indicators_settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = bars_to_rows(generate_bars("H1", 300, seed=44))
    r = await _post(indicators, "DUP", [*rows[:280], rows[279], *rows[281:]])
    assert r.status_code == 422 and "bar 280: duplicate timestamp" in r.json()["detail"]
    body = orjson.dumps({"bars": rows})
    trailing_comma = body[:-2] + b",]}"
    r = await indicators.post("/v1/bars/COMMA/H1", content=trailing_comma)
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    monkeypatch.setattr(indicators_settings, "max_bars_per_request", 299)
    r = await indicators.post("/v1/bars/MANY/H1", content=body)
    assert r.status_code == 413 and "300 bars in one request; the limit is 299" in r.json()["detail"]
    for symbol in ("DUP", "COMMA", "MANY"):
        assert await _stored(database_url, symbol) == ([], None)
