"""Rollout routing: the sticky split, the test group, the symbol rollout, the request-id split, caches that
never cross variants, and shadow predictions that are logged but never returned."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.predictor.deps import predictor_of
from services.predictor.main import create_app
from services.predictor.routing import bucket, route
from services.predictor.service import Predictor
from services.predictor.settings import PredictorSettings
from shared.rollouts import Rollout
from shared.storage import ObjectStore
from tests.predictor.model_factory import register, write_model
from tests.support.clients import asgi_client
from tests.support.keys import READ_KEY
from tests.support.routing import ingest, model_id, production_and_candidate, set_rollout

SYM = "ROUT1"
NO_CACHE = {"Cache-Control": "no-cache"}
USERS = [f"user-{i}" for i in range(10_000)]
OFF: dict[str, Any] = {
    "candidate_traffic_percent": 0.0,
    "test_group_user_ids": [],
    "rollout_symbols": [],
    "shadow": False,
}


def _rollout(percent: float, **extra: object) -> Rollout:
    values: dict[str, object] = {
        "symbol": SYM,
        "timeframe": "H1",
        "policy": "canary",
        "candidate_model_id": 1,
        "candidate_traffic_percent": percent,
        "test_group_user_ids": [],
        "rollout_symbols": [],
        "shadow": False,
    }
    values.update(extra)
    return Rollout.model_validate(values)


@pytest.fixture(scope="module")
async def candidate_id(
    indicators_url: str, database_url: str, store: ObjectStore, scaler: tuple[list[float], list[float]]
) -> int:
    """ROUT1 H1: production p1 (always BUY), candidate c1 (always SELL)."""
    await ingest(indicators_url, SYM)
    return await production_and_candidate(database_url, store, SYM, scaler)


@pytest.fixture
def predictor(app: FastAPI, client: httpx.AsyncClient) -> Predictor:
    return predictor_of(app)


async def _seen(predictor: Predictor, updated_at: datetime, timeout_s: float = 10.0) -> None:
    """Wait until `predictor` has read the rollouts row written at `updated_at`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = predictor.models.rollout(SYM, "H1")
        if r is not None and r.updated_at == updated_at:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the predictor did not read the rollout of {updated_at} within {timeout_s} s")


async def _post(
    client: httpx.AsyncClient, user: str | None, headers: dict[str, str] | None = None
) -> dict[str, object]:
    body: dict[str, object] = {"symbol": SYM, "timeframe": "H1"}
    if user is not None:
        body["user_id"] = user
    r = await client.post("/v1/predictions", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


def _strings(value: object) -> set[str]:
    """Every string in a parsed JSON document, keys included."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(k) | _strings(v) for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value))
    return set()


def _served_by(body: dict[str, object], variant: str) -> None:
    """The response names the variant, and the model that answered is that variant's."""
    version, signal = ("c1", "SELL") if variant == "candidate" else ("p1", "BUY")
    assert (body["variant"], body["model_version"], body["signal"]) == (variant, version, signal), body


def test_split_rules() -> None:
    r = _rollout(30)
    chosen = [route(r, SYM, u, None, "salt") == "candidate" for u in USERS]
    assert abs(sum(chosen) / len(USERS) - 0.30) <= 0.02
    assert [route(r, SYM, u, "another-request", "salt") == "candidate" for u in USERS] == chosen  # user id wins
    # Raising the percent only adds users to the candidate.
    wider = [route(_rollout(50), SYM, u, None, "salt") == "candidate" for u in USERS]
    assert all(w for c, w in zip(chosen, wider, strict=True) if c) and sum(wider) > sum(chosen)
    # Another series draws its own buckets: its 30 % overlap this one's in about 30 % x 30 % of users.
    other = [route(_rollout(30, symbol="OTHER"), "OTHER", u, None, "salt") == "candidate" for u in USERS]
    both = sum(a and b for a, b in zip(chosen, other, strict=True)) / len(USERS)
    assert 0.07 <= both <= 0.11
    # Another salt re-draws the buckets.
    assert [route(r, SYM, u, None, "salt2") == "candidate" for u in USERS] != chosen
    # The documented formula, and the edges.
    assert bucket("s", SYM, "H1", "u") == int.from_bytes(hashlib.sha256(b"s:ROUT1:H1:u").digest()[:8]) % 10_000
    assert route(r, SYM, None, "rid-7", "salt") == route(r, SYM, "rid-7", None, "salt")
    assert route(r, SYM, None, None, "salt") == "production"
    assert all(route(_rollout(100), SYM, u, None, "salt") == "candidate" for u in USERS[:500])
    assert not any(route(_rollout(0), SYM, u, None, "salt") == "candidate" for u in USERS[:500])
    assert route(_rollout(100, candidate_model_id=None), SYM, "u", None, "salt") == "production"


async def test_split_is_sticky_across_calls_and_a_restart(
    candidate_id: int,
    predictor: Predictor,
    client: httpx.AsyncClient,
    database_url: str,
    settings: PredictorSettings,
) -> None:
    at = await set_rollout(
        database_url, SYM, **{**OFF, "candidate_model_id": candidate_id, "candidate_traffic_percent": 30.0}
    )
    await _seen(predictor, at)
    first = [predictor.select_model(SYM, "H1", u, None) for u in USERS]
    variants = [v for _, v in first]
    assert abs(variants.count("candidate") / len(USERS) - 0.30) <= 0.02
    assert all(m.version == ("c1" if v == "candidate" else "p1") for m, v in first)
    assert [predictor.select_model(SYM, "H1", u, f"req-{u}")[1] for u in USERS] == variants
    picked = [USERS[variants.index("candidate")], USERS[variants.index("production")]]
    for user in picked:
        _served_by(await _post(client, user), variants[USERS.index(user)])

    # A restarted predictor (a new app: its own manager, its own rollout read) buckets every user the same.
    app2 = create_app(settings)
    async for client2 in asgi_client(app2, READ_KEY):
        restarted = predictor_of(app2)
        await _seen(restarted, at)
        assert [restarted.select_model(SYM, "H1", u, None)[1] for u in USERS] == variants
        for user in picked:
            _served_by(await _post(client2, user), variants[USERS.index(user)])


async def test_test_group_and_symbol_rollout(
    candidate_id: int, predictor: Predictor, client: httpx.AsyncClient, database_url: str
) -> None:
    at = await set_rollout(
        database_url, SYM, **{**OFF, "candidate_model_id": candidate_id, "test_group_user_ids": ["vip-1", "vip-2"]}
    )
    await _seen(predictor, at)
    for vip in ("vip-1", "vip-2"):
        _served_by(await _post(client, vip), "candidate")
    _served_by(await _post(client, "not-a-vip"), "production")
    assert {predictor.select_model(SYM, "H1", u, None)[1] for u in USERS[:1000]} == {"production"}
    signal = (await client.get(f"/v1/signals/{SYM}/H1")).json()
    _served_by(signal, "production")

    at = await set_rollout(database_url, SYM, test_group_user_ids=[], rollout_symbols=[SYM])
    await _seen(predictor, at)
    assert {predictor.select_model(SYM, "H1", u, None)[1] for u in USERS[:1000]} == {"candidate"}
    _served_by(await _post(client, "not-a-vip"), "candidate")
    _served_by((await client.get(f"/v1/signals/{SYM}/H1")).json(), "candidate")


async def _half_on_candidate(database_url: str, predictor: Predictor, candidate_id: int) -> Rollout | None:
    """The candidate at 50 % traffic (no test group, no shadow), once `predictor` has read it: its rollout."""
    at = await set_rollout(
        database_url, SYM, **{**OFF, "candidate_model_id": candidate_id, "candidate_traffic_percent": 50.0}
    )
    await _seen(predictor, at)
    return predictor.models.rollout(SYM, "H1")


async def test_without_a_user_id_the_request_id_splits(
    candidate_id: int, predictor: Predictor, client: httpx.AsyncClient, database_url: str, settings: PredictorSettings
) -> None:
    rollout = await _half_on_candidate(database_url, predictor, candidate_id)
    seen: set[str] = set()
    for i in range(30):
        rid = f"split-request-{i}"
        expected = route(rollout, SYM, None, rid, settings.rollout_salt)
        for _ in range(2):  # the same request id again: the same variant
            r = await client.get(f"/v1/signals/{SYM}/H1", headers={"X-Request-ID": rid})
            assert r.status_code == 200, r.text
            _served_by(r.json(), expected)
        seen.add(expected)
    assert seen == {"production", "candidate"}


async def _logged(database_url: str, predictor: Predictor, where: str, *args: object) -> list[asyncpg.Record]:
    await predictor.log.flush()
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT id::text AS id, variant, model_version, signal, probabilities, bar_ts, window_hash, cached, "
                f"request_id FROM predictions WHERE {where} ORDER BY created_at",
                *args,
            )
        )
    finally:
        await conn.close()


async def test_a_cached_answer_never_crosses_variants(
    candidate_id: int, predictor: Predictor, client: httpx.AsyncClient, database_url: str, settings: PredictorSettings
) -> None:
    rollout = await _half_on_candidate(database_url, predictor, candidate_id)
    on_candidate = next(u for u in USERS if route(rollout, SYM, u, None, settings.rollout_salt) == "candidate")
    on_production = next(u for u in USERS if route(rollout, SYM, u, None, settings.rollout_salt) == "production")

    a1 = await _post(client, on_candidate, NO_CACHE)
    _served_by(a1, "candidate")
    a2 = await _post(client, on_candidate)
    assert a2["cached"] is True
    _served_by(a2, "candidate")
    b1 = await _post(client, on_production)  # the candidate's fresh entry is right there: never served here
    _served_by(b1, "production")
    b2 = await _post(client, on_production)
    assert b2["cached"] is True
    _served_by(b2, "production")
    a3 = await _post(client, on_candidate)
    assert a3["cached"] is True
    _served_by(a3, "candidate")

    served = {str(b["prediction_id"]): b for b in (a1, a2, b1, b2, a3)}
    rows = await _logged(database_url, predictor, "id = ANY($1::uuid[])", list(served))
    assert len(rows) == 5
    for row in rows:
        body = served[row["id"]]
        assert (row["variant"], row["model_version"], row["cached"]) == (
            body["variant"],
            body["model_version"],
            body["cached"],
        )


async def test_shadow_is_logged_never_returned_and_leaves_the_response_alone(
    candidate_id: int, predictor: Predictor, client: httpx.AsyncClient, database_url: str
) -> None:
    at = await set_rollout(database_url, SYM, **{**OFF, "candidate_model_id": candidate_id})
    await _seen(predictor, at)
    plain = await _post(client, "shadowed", {**NO_CACHE, "X-Request-ID": "shadow-off"})

    at = await set_rollout(database_url, SYM, shadow=True)
    await _seen(predictor, at)
    r = await client.post(
        "/v1/predictions",
        json={"symbol": SYM, "timeframe": "H1", "user_id": "shadowed"},
        headers={**NO_CACHE, "X-Request-ID": "shadow-on"},
    )
    assert r.status_code == 200, r.text
    shadowed = r.json()
    _served_by(shadowed, "production")
    assert not {"c1", "shadow"} & _strings(shadowed)  # the candidate's answer is nowhere in it
    volatile = {"prediction_id", "generated_at"}
    assert {k: v for k, v in shadowed.items() if k not in volatile} == {
        k: v for k, v in plain.items() if k not in volatile
    }
    cached = await _post(client, "shadowed", {"X-Request-ID": "shadow-cached"})
    assert cached["cached"] is True

    await asyncio.sleep(0.2)
    rows = await _logged(
        database_url, predictor, "request_id = ANY($1::text[])", ["shadow-off", "shadow-on", "shadow-cached"]
    )
    by_request: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_request.setdefault(row["request_id"], []).append(row)
    assert [x["variant"] for x in by_request["shadow-off"]] == ["production"]
    assert [x["variant"] for x in by_request["shadow-cached"]] == ["production"]  # a cached hit is not rescored
    variants = {x["variant"]: x for x in by_request["shadow-on"]}
    assert set(variants) == {"production", "shadow"} and len(by_request["shadow-on"]) == 2
    shadow, production = variants["shadow"], variants["production"]
    assert (shadow["model_version"], shadow["signal"], shadow["cached"]) == ("c1", "SELL", False)
    assert production["id"] == shadowed["prediction_id"] and production["model_version"] == "p1"
    # The same bar and the same input window, scored by the candidate.
    assert shadow["bar_ts"] == production["bar_ts"] and shadow["window_hash"] == production["window_hash"]
    assert shadow["probabilities"][0] == pytest.approx(1.0, abs=1e-3)  # SELL
    assert predictor.shadow_failures == 0

    # A request the candidate serves is not shadowed as well.
    at = await set_rollout(database_url, SYM, rollout_symbols=[SYM])
    await _seen(predictor, at)
    served = await _post(client, "shadowed", {**NO_CACHE, "X-Request-ID": "shadow-candidate"})
    _served_by(served, "candidate")
    await asyncio.sleep(0.2)
    rows = await _logged(database_url, predictor, "request_id = $1", "shadow-candidate")
    assert [x["variant"] for x in rows] == ["candidate"]


async def test_a_candidate_that_cannot_serve_leaves_production_serving(
    candidate_id: int,
    predictor: Predictor,
    client: httpx.AsyncClient,
    database_url: str,
    store: ObjectStore,
    scaler: tuple[list[float], list[float]],
) -> None:
    # A checksum that does not match: the load fails, the candidate serves nobody.
    write_model(store, SYM, "H1", "c-broken", seed=7, mean=scaler[0], scale=scaler[1])
    await register(database_url, store, SYM, "H1", "c-broken", "0" * 64, status="candidate")
    broken = await model_id(database_url, SYM, "c-broken")
    at = await set_rollout(database_url, SYM, **{**OFF, "candidate_model_id": broken, "rollout_symbols": [SYM]})
    await _seen(predictor, at)
    assert predictor.models.candidate(SYM, "H1") is None
    _served_by(await _post(client, "anyone", NO_CACHE), "production")

    # A candidate that is no longer status candidate (archived) is not loaded either.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE model_versions SET status = 'archived' WHERE id = $1", candidate_id)
        at = await set_rollout(database_url, SYM, candidate_model_id=candidate_id)
        await _seen(predictor, at)
        assert predictor.models.candidate(SYM, "H1") is None
        _served_by(await _post(client, "anyone", NO_CACHE), "production")
    finally:
        await conn.execute("UPDATE model_versions SET status = 'candidate' WHERE id = $1", candidate_id)
        await conn.close()
    at = await set_rollout(database_url, SYM, candidate_model_id=candidate_id)
    await _seen(predictor, at)
    _served_by(await _post(client, "anyone", NO_CACHE), "candidate")
