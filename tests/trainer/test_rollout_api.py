"""The lifecycle control plane through the trainer API (rollouts, promote, rollback, the audit trail, the
job.create audit row) and through the CLI (`aicash models promote|rollback`, `rollout show|set`, `audit`), on real
PostgreSQL and Redis. The state machine itself is tested in test_lifecycle.py."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from services.trainer import repository as repo
from services.trainer.main import create_app
from services.trainer.schemas import ModelVersion
from services.trainer.settings import TrainerSettings
from shared.timeframes import Timeframe
from tests.support.clients import asgi_client
from tests.support.keys import API_KEYS, READ_KEY, WRITE_KEY
from tests.support.registry import TF, register_version, series_symbol, with_connection
from tests.support.trainer import ingest


@pytest.fixture(scope="module")
def queue(redis_url: str) -> Iterator[str]:
    """A queue nobody consumes (the job test only needs the message sent), deleted afterwards."""
    import redis

    name = f"trainer-rollout-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    client.delete(name)
    client.close()


@pytest.fixture(scope="module")
def settings(database_url: str, redis_url: str, queue: str) -> TrainerSettings:
    return TrainerSettings(
        database_url=database_url, redis_url=redis_url, api_keys=API_KEYS, environment="test", trainer_queue=queue
    )


@pytest.fixture(scope="module")
async def client(settings: TrainerSettings) -> AsyncIterator[httpx.AsyncClient]:
    async for c in asgi_client(create_app(settings)):
        yield c


@pytest.fixture
def symbol() -> str:
    return series_symbol("RA")


async def register(database_url: str, symbol: str, n: int, *, timeframe: str = TF) -> ModelVersion:
    return await with_connection(database_url, lambda c: register_version(c, symbol, n, timeframe=timeframe))


async def set_status(database_url: str, v: ModelVersion, status: str) -> None:
    await with_connection(database_url, lambda c: repo.set_status(c, v.id, status))


async def audit_count(database_url: str, symbol: str) -> int:
    n: int = await with_connection(
        database_url, lambda c: c.fetchval("SELECT count(*) FROM audit_log WHERE symbol = $1", symbol)
    )
    return n


# --- roles ------------------------------------------------------------------------------------------------------


@pytest.mark.faults
async def test_every_lifecycle_route_needs_admin(settings: TrainerSettings, symbol: str) -> None:
    app = create_app(settings)
    routes = [
        ("GET", f"/v1/rollouts/{symbol}/{TF}", None),
        ("PUT", f"/v1/rollouts/{symbol}/{TF}", {"shadow": True}),
        ("POST", "/v1/models/1/promote", None),
        ("POST", f"/v1/models/{symbol}/{TF}/rollback", None),
        ("GET", "/v1/audit", None),
    ]
    for key in (READ_KEY, WRITE_KEY):
        async for c in asgi_client(app, key):
            for method, path, body in routes:
                r = await c.request(method, path, json=body)
                assert r.status_code == 403, (method, path, r.text)
    async for anonymous in asgi_client(app, None):
        for method, path, body in routes:
            assert (await anonymous.request(method, path, json=body)).status_code == 401


# --- rollouts ---------------------------------------------------------------------------------------------------


async def test_get_rollout_of_an_unconfigured_series_shows_the_defaults(
    client: httpx.AsyncClient, database_url: str, symbol: str
) -> None:
    v1 = await register(database_url, symbol, 1)
    r = await client.get(f"/v1/rollouts/{symbol}/{TF}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"] == "canary" and body["candidate_model_id"] is None and body["updated_at"] is None
    assert (body["production_model_id"], body["production_version"]) == (v1.id, v1.version)
    assert (await client.get(f"/v1/rollouts/{symbol}/X9")).status_code == 422
    assert (await client.get(f"/v1/rollouts/bad%20symbol/{TF}")).status_code == 422


async def test_put_keeps_absent_fields_and_null_clears_the_candidate(
    client: httpx.AsyncClient, database_url: str, symbol: str
) -> None:
    await register(database_url, symbol, 1)
    v2 = await register(database_url, symbol, 2)
    r = await client.put(
        f"/v1/rollouts/{symbol}/{TF}",
        json={
            "candidate_model_id": v2.id,
            "candidate_traffic_percent": 15,
            "test_group_user_ids": ["alice"],
            "rollout_symbols": ["EURUSD"],
            "policy": "manual",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["candidate_version"] == v2.version and r.json()["updated_by"] == "admin"
    r = await client.put(f"/v1/rollouts/{symbol}/{TF}", json={"shadow": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["candidate_model_id"], body["candidate_traffic_percent"], body["policy"], body["shadow"]) == (
        v2.id,
        15,
        "manual",
        True,
    )
    assert body["test_group_user_ids"] == ["alice"] and body["rollout_symbols"] == ["EURUSD"]
    r = await client.put(f"/v1/rollouts/{symbol}/{TF}", json={"candidate_model_id": None})
    assert r.status_code == 200 and r.json()["candidate_model_id"] is None and r.json()["shadow"] is True
    assert r.json()["candidate_traffic_percent"] == 15
    assert (await client.get(f"/v1/rollouts/{symbol}/{TF}")).json()["candidate_model_id"] is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"candidate_traffic_percent": 101}, "candidate_traffic_percent: Input should be less than or equal to 100"),
        ({"candidate_traffic_percent": -0.5}, "candidate_traffic_percent: Input should be greater than or equal to 0"),
        ({"policy": "yolo"}, "policy: Input should be 'direct', 'canary' or 'manual'"),
        ({"policy": None}, "policy may not be null: leave it out to keep its value"),
        ({"shadow": None}, "shadow may not be null"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"rollout_symbols": ["eur usd"]}, "rollout_symbols.0: String should match pattern"),
    ],
)
async def test_put_bad_bodies_are_422_naming_the_field(
    client: httpx.AsyncClient, database_url: str, symbol: str, body: dict[str, Any], fragment: str
) -> None:
    r = await client.put(f"/v1/rollouts/{symbol}/{TF}", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]
    assert await audit_count(database_url, symbol) == 0


async def test_put_nan_traffic_is_422_not_500(client: httpx.AsyncClient, symbol: str) -> None:
    r = await client.put(
        f"/v1/rollouts/{symbol}/{TF}",
        content='{"candidate_traffic_percent": NaN}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422, r.text


async def test_put_candidate_checks_are_404_422_and_409_with_what_to_do(
    client: httpx.AsyncClient, database_url: str, symbol: str
) -> None:
    v1 = await register(database_url, symbol, 1)
    await register(database_url, symbol, 2, timeframe="D1")
    other = await register(database_url, symbol, 3, timeframe="D1")
    failed = await register(database_url, symbol, 4)
    await set_status(database_url, failed, "failed")
    archived = await register(database_url, symbol, 5)
    await set_status(database_url, archived, "archived")
    url = f"/v1/rollouts/{symbol}/{TF}"

    r = await client.put(url, json={"candidate_model_id": 987654321})
    assert r.status_code == 404 and "no model version with id 987654321" in r.json()["detail"]
    r = await client.put(url, json={"candidate_model_id": other.id})
    assert r.status_code == 422
    assert f"belongs to {symbol} D1" in r.json()["detail"] and f"PUT /v1/rollouts/{symbol}/D1" in r.json()["detail"]
    r = await client.put(url, json={"candidate_model_id": v1.id})
    assert r.status_code == 409 and "already production" in r.json()["detail"]
    r = await client.put(url, json={"candidate_model_id": failed.id})
    assert r.status_code == 409 and "train a new version" in r.json()["detail"]
    r = await client.put(url, json={"candidate_model_id": archived.id})
    assert r.status_code == 409 and "archived" in r.json()["detail"]
    assert await audit_count(database_url, symbol) == 0


# --- promote and rollback ---------------------------------------------------------------------------------------


async def test_promote_then_rollback_then_rollback_again(
    client: httpx.AsyncClient, database_url: str, symbol: str
) -> None:
    v1 = await register(database_url, symbol, 1)
    v2 = await register(database_url, symbol, 2)
    v3 = await register(database_url, symbol, 3)
    r = await client.post(f"/v1/models/{v2.id}/promote", json={"reason": "better on the canary"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "production" and r.json()["promoted_at"] is not None
    assert "promoted to production by an admin" in r.json()["quality"]["reasons"]
    r = await client.post(f"/v1/models/{v3.id}/promote")  # no body at all
    assert r.status_code == 200, r.text

    r = await client.post(f"/v1/models/{symbol}/{TF}/rollback", json={"reason": "live hit rate fell"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == v2.id and r.json()["status"] == "production"
    detail = (await client.get(f"/v1/models/{v3.id}")).json()
    assert detail["status"] == "archived" and detail["rolled_back_at"] is not None and detail["retired_at"]

    r = await client.post(f"/v1/models/{symbol}/{TF}/rollback")
    assert r.status_code == 200 and r.json()["id"] == v1.id
    r = await client.post(f"/v1/models/{symbol}/{TF}/rollback")
    assert r.status_code == 409 and "promote a version instead" in r.json()["detail"]

    page = (await client.get("/v1/audit", params={"symbol": symbol})).json()
    actions = [(e["action"], e["actor"]) for e in page["entries"]]
    assert actions == [
        ("model.rollback", "admin"),
        ("model.rollback", "admin"),
        ("model.promote", "admin"),
        ("model.promote", "admin"),
    ]
    assert page["entries"][1]["evidence"] == {"reason": "live hit rate fell"}
    assert page["entries"][3]["evidence"] == {"reason": "better on the canary"}


async def test_promote_bad_input_is_404_or_409_and_keeps_the_verdict_unchanged(
    client: httpx.AsyncClient, database_url: str, symbol: str
) -> None:
    r = await client.post("/v1/models/987654321/promote")
    assert r.status_code == 404 and "no model version with id 987654321" in r.json()["detail"]
    await register(database_url, symbol, 1)
    failed = await register(database_url, symbol, 2)
    await set_status(database_url, failed, "failed")
    r = await client.post(f"/v1/models/{failed.id}/promote")
    assert r.status_code == 409 and r.json()["error"] == "conflict"
    assert "train a new version instead" in r.json()["detail"]
    archived = await register(database_url, symbol, 3)
    await set_status(database_url, archived, "archived")
    r = await client.post(f"/v1/models/{archived.id}/promote")
    assert r.status_code == 409 and f"POST /v1/models/{symbol}/{TF}/rollback" in r.json()["detail"]
    got = (await client.get(f"/v1/models/{archived.id}")).json()
    assert "promoted to production by an admin" not in got["quality"]["reasons"]
    r = await client.post(f"/v1/models/{symbol}/{TF}/rollback")
    assert r.status_code == 409 and "no previous production version" in r.json()["detail"]
    r = await client.post(f"/v1/models/{archived.id}/promote", json={"reason": "x", "force": True})
    assert r.status_code == 422
    assert await audit_count(database_url, symbol) == 0


# --- the audit trail ------------------------------------------------------------------------------------------


async def test_audit_filters_and_pages_newest_first(client: httpx.AsyncClient, database_url: str, symbol: str) -> None:
    await register(database_url, symbol, 1)
    for pct in range(1, 8):
        r = await client.put(
            f"/v1/rollouts/{symbol}/{TF}",
            json={"candidate_traffic_percent": pct},
            headers={"X-Request-ID": f"req-{symbol}-{pct}"},
        )
        assert r.status_code == 200
    v2 = await register(database_url, symbol, 2)
    assert (await client.post(f"/v1/models/{v2.id}/promote")).status_code == 200

    everything = (await client.get("/v1/audit", params={"symbol": symbol, "limit": 1000})).json()
    ids = [e["id"] for e in everything["entries"]]
    assert len(ids) == 8 and ids == sorted(ids, reverse=True) and everything["next_before_id"] is None
    newest = everything["entries"][1]  # the last rollout change
    assert newest["request_id"] == f"req-{symbol}-7" and newest["after"]["candidate_traffic_percent"] == 7
    assert newest["before"]["candidate_traffic_percent"] == 6 and newest["target"] == f"rollout:{symbol}/{TF}"

    # Pages of 3 by the before_id cursor: every row once, in order.
    seen: list[int] = []
    params: dict[str, Any] = {"symbol": symbol, "action": "rollout.update", "limit": 3}
    while True:
        page = (await client.get("/v1/audit", params=params)).json()
        seen += [e["id"] for e in page["entries"]]
        if page["next_before_id"] is None:
            break
        params["before_id"] = page["next_before_id"]
    assert seen == ids[1:]

    only = (await client.get("/v1/audit", params={"symbol": symbol, "action": "model.promote"})).json()["entries"]
    assert [e["target"] for e in only] == [f"model_version:{v2.id}"]
    assert (await client.get("/v1/audit", params={"symbol": symbol, "actor": "nobody"})).json()["entries"] == []
    at = everything["entries"][3]["at"]
    since = (await client.get("/v1/audit", params={"symbol": symbol, "since": at})).json()["entries"]
    until = (await client.get("/v1/audit", params={"symbol": symbol, "until": at})).json()["entries"]
    assert [e["id"] for e in since] == ids[:4] and [e["id"] for e in until] == ids[4:]
    assert (await client.get("/v1/audit", params={"symbol": symbol, "timeframe": "D1"})).json()["entries"] == []
    assert (await client.get("/v1/audit", params={"limit": 1001})).status_code == 422
    assert (await client.get("/v1/audit", params={"since": "yesterday"})).status_code == 422


async def test_queueing_a_job_writes_a_job_create_row_and_a_refused_one_none(
    client: httpx.AsyncClient, database_url: str, symbol: str
) -> None:
    from tests.data import generate_bars

    await ingest(database_url, symbol, Timeframe.H1, generate_bars("H1", 300, seed=3))
    r = await client.post(
        "/v1/jobs", json={"kind": "train", "symbol": symbol, "timeframe": TF}, headers={"X-Request-ID": "job-req-1"}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    try:
        again = await client.post("/v1/jobs", json={"kind": "train", "symbol": symbol, "timeframe": TF})
        assert again.status_code == 409
        (row,) = (await client.get("/v1/audit", params={"symbol": symbol, "action": "job.create"})).json()["entries"]
        assert (row["actor"], row["target"], row["request_id"]) == ("admin", f"job:{job_id}", "job-req-1")
        assert row["after"]["kind"] == "train" and row["after"]["status"] == "queued"
    finally:
        await with_connection(database_url, lambda c: repo.fail_job(c, job_id, "test: nobody consumes this queue"))


async def test_openapi_lists_the_lifecycle_routes_and_their_errors(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/v1/rollouts/{symbol}/{timeframe}"]) == {"get", "put"}
    assert {"404", "409", "422"} <= set(paths["/v1/rollouts/{symbol}/{timeframe}"]["put"]["responses"])
    assert {"404", "409"} <= set(paths["/v1/models/{model_id}/promote"]["post"]["responses"])
    assert "409" in paths["/v1/models/{symbol}/{timeframe}/rollback"]["post"]["responses"]
    assert "before_id" in {p["name"] for p in paths["/v1/audit"]["get"]["parameters"]}


# --- the CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(database_url: str) -> Iterator[typer.Typer]:
    from services.trainer.cli import register as register_cli
    from services.trainer.settings import get_trainer_settings

    mp = pytest.MonkeyPatch()
    mp.setenv("DATABASE_URL", database_url)
    mp.setenv("USER", "tester")
    mp.setenv("LOGNAME", "tester")
    get_trainer_settings.cache_clear()
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """aicash"""

    register_cli(app)
    yield app
    get_trainer_settings.cache_clear()
    mp.undo()


def _json(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


def test_cli_rollout_promote_rollback_and_audit(cli: typer.Typer, database_url: str) -> None:
    symbol = f"RC{uuid.uuid4().hex[:8].upper()}"
    v1 = asyncio.run(register(database_url, symbol, 1))
    v2 = asyncio.run(register(database_url, symbol, 2))
    runner = CliRunner()
    series = ["--symbol", symbol, "--timeframe", TF]

    r = runner.invoke(cli, ["rollout", "show", *series, "--json"])
    assert r.exit_code == 0, r.output
    assert _json(r.output)["policy"] == "canary" and _json(r.output)["production_model_id"] == v1.id
    r = runner.invoke(
        cli,
        ["rollout", "set", *series, "--candidate", str(v2.id), "--traffic", "30", "--test-users", "a,b", "--shadow"],
    )
    assert r.exit_code == 0, r.output
    assert v2.version in r.output and "a, b" in r.output
    r = runner.invoke(cli, ["rollout", "set", *series, "--policy", "manual", "--json"])
    body = _json(r.output)
    assert (body["policy"], body["candidate_model_id"], body["candidate_traffic_percent"], body["shadow"]) == (
        "manual",
        v2.id,
        30,
        True,
    )
    r = runner.invoke(cli, ["rollout", "set", *series, "--traffic", "150"])
    assert r.exit_code == 2 and "outside 0..100" in r.output
    r = runner.invoke(cli, ["rollout", "set", *series])
    assert r.exit_code == 2 and "nothing to change" in r.output

    r = runner.invoke(cli, ["models", "promote", str(v2.id), "--reason", "cli test", "--json"])
    assert r.exit_code == 0, r.output
    assert _json(r.output)["status"] == "production"
    r = runner.invoke(cli, ["models", "promote", "987654321"])
    assert r.exit_code == 2 and "not_found" in r.output
    r = runner.invoke(cli, ["rollout", "show", *series])
    assert r.exit_code == 0 and "candidate traffic %" in r.output

    r = runner.invoke(cli, ["models", "rollback", *series, "--json"])
    assert r.exit_code == 0, r.output
    assert _json(r.output)["id"] == v1.id
    r = runner.invoke(cli, ["models", "rollback", *series])
    assert r.exit_code == 2 and "promote a version instead" in " ".join(r.output.split())

    r = runner.invoke(cli, ["audit", "--symbol", symbol, "--json"])
    assert r.exit_code == 0, r.output
    rows = _json(r.output)
    assert [row["action"] for row in rows] == ["model.rollback", "model.promote", "rollout.update", "rollout.update"]
    assert {row["actor"] for row in rows} == {"cli:tester"}
    assert rows[1]["evidence"] == {"reason": "cli test"}
    r = runner.invoke(cli, ["audit", "--symbol", symbol, "--action", "model.promote", "--json"])
    assert r.exit_code == 0 and [row["id"] for row in _json(r.output)] == [rows[1]["id"]]
    r = runner.invoke(cli, ["audit", "--symbol", symbol, "--limit", "2"])
    assert r.exit_code == 0 and f"older rows: --before-id {rows[1]['id']}" in " ".join(r.output.split())
    r = runner.invoke(cli, ["audit", "--since", "yesterday"])
    assert r.exit_code == 2 and "ISO 8601" in r.output
