"""Fault case 9, auth: every operation of every service is checked against the role its OpenAPI schema declares.

Each operation carries `x-required-role` (read, write, admin or public), written from the route's own auth
dependency (shared.auth.document_roles), so a new route gets a role in its schema by the same code that guards
it, and a route without a key check shows as `public` and fails here unless it is on the public list. Then each
operation is called without a key (401), with a wrong key (401), with every lower role (403) and with its role
(neither). Every admin action that changes something leaves an audit row naming the key.

Pass criterion: all of the above for the three services, in process (httpx ASGITransport), on the run's real
PostgreSQL and Redis. Measured (2 cores, shared): 37 guarded operations (indicators 5, trainer 16, predictor 16)
checked with 4-5 calls each in 0.5 s in all; the seven audited admin actions in 1.3 s.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from shared.auth import REQUIRED_ROLE
from shared.bars import bars_to_rows
from shared.storage import store_from_url
from tests.data import generate_bars
from tests.predictor.model_factory import register, write_model
from tests.support.faults_apps import (
    KEYS,
    PUBLIC,
    ROLES,
    Service,
    concrete_path,
    operations,
    retire,
    row_count,
    three_apps,
)
from tests.support.registry import register_version, series_symbol, with_connection

SERVICES = ("indicators", "trainer", "predictor")
AUDIT_SYMBOL = "AUDITFX"  # the series the audited admin actions act on
WRONG_KEY = "not-a-key-of-this-run-0001"


@pytest.fixture(scope="module")
async def services(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Service]]:
    store_dir = tmp_path_factory.mktemp("auth-models")
    # A served series, so the predictor accepts a webhook for it: a model registered before the app starts.
    store = store_from_url(f"file://{store_dir}")
    sha = write_model(store, AUDIT_SYMBOL, "H1", "hook-v1")
    await register(database_url, store, AUDIT_SYMBOL, "H1", "hook-v1", sha)
    async with three_apps(database_url, redis_url, Path(store_dir), webhook_allow_private_targets=True) as apps:
        yield apps
    await retire(database_url, AUDIT_SYMBOL)


def schema_of(service: Service) -> dict[str, Any]:
    return service.app.openapi()


@pytest.mark.parametrize("name", SERVICES)
def test_every_operation_states_its_role_and_only_listed_ones_are_public(
    services: dict[str, Service], name: str
) -> None:
    service = services[name]
    schema = schema_of(service)
    public = set()
    for method, path, op in operations(schema):
        role = op.get(REQUIRED_ROLE)
        assert role in (*ROLES, "public"), f"{name} {method} {path}: {REQUIRED_ROLE} is {role!r}"
        if role == "public":
            public.add((method, path))
        # The docstring (the operation's text) says the same role as the code.
        said = set(re.findall(r"\brole (read|write|admin)\b", op.get("description", "")))
        assert said <= {role}, f"{name} {method} {path}: the text says role {said}, the code needs {role}"
    assert public <= PUBLIC, f"{name}: unguarded operations not on the public list: {sorted(public - PUBLIC)}"
    # Routes left out of the schema (metrics, docs) have no role to state: each must be on the public list.
    in_schema = {(m, p) for m, p, _ in operations(schema)}
    for route in service.app.routes:
        for method in getattr(route, "methods", None) or ():
            key = (method, getattr(route, "path", ""))
            if method != "HEAD" and key not in in_schema:
                assert key in PUBLIC, f"{name}: {key} is not in the OpenAPI document and not listed as public"


def _body(method: str) -> bytes | None:
    return b"{}" if method in ("POST", "PUT", "PATCH") else None


async def _call(service: Service, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    return await service.client.request(method, concrete_path(path), headers=headers, content=_body(method))


@pytest.mark.parametrize("name", SERVICES)
async def test_each_operation_enforces_its_declared_role(services: dict[str, Service], name: str) -> None:
    service = services[name]
    checked = 0
    start = time.perf_counter()
    for method, path, op in operations(schema_of(service)):
        role = op[REQUIRED_ROLE]
        where = f"{name} {method} {path} (role {role})"
        if role == "public":
            r = await _call(service, method, path, None)
            assert r.status_code not in (401, 403) and r.status_code != 500, f"{where}: {r.status_code} {r.text}"
            continue
        for key, want in ((None, 401), (WRONG_KEY, 401)):
            r = await _call(service, method, path, key)
            assert r.status_code == want, f"{where}, key {key!r}: {r.status_code} {r.text}"
            assert r.json()["error"] == "unauthorized", where
        for lower in ROLES[: ROLES.index(role)]:
            r = await _call(service, method, path, KEYS[lower])
            assert r.status_code == 403, f"{where}, a {lower} key: {r.status_code} {r.text}"
            assert r.json()["error"] == "forbidden" and role in r.json()["detail"], where
        for enough in ROLES[ROLES.index(role) :]:
            r = await _call(service, method, path, KEYS[enough])
            assert r.status_code not in (401, 403, 500), f"{where}, a {enough} key: {r.status_code} {r.text}"
        checked += 1
    print(f"{name}: {checked} guarded operations checked in {time.perf_counter() - start:.2f} s")
    assert checked >= 5


# --- every admin action leaves an audit row -----------------------------------------------------------------


async def _audit_rows(database_url: str, action: str) -> int:
    # Each run has a database of its own and its tests run one at a time: no other writer of these rows.
    return await row_count(database_url, "SELECT count(*) FROM audit_log WHERE action = $1 AND actor = 'admin'", action)


async def test_every_admin_action_leaves_an_audit_row(services: dict[str, Service], database_url: str) -> None:
    """Each admin operation that changes state (any method but GET), found from the schemas, is made to succeed
    once with the admin key; afterwards the audit trail has one more row of its action with actor `admin`.
    A new admin action without a case here fails the test."""
    admin_ops = {
        (name, method, path)
        for name in SERVICES
        for method, path, op in operations(schema_of(services[name]))
        if op[REQUIRED_ROLE] == "admin" and method != "GET"
    }
    ind, trainer, predictor = services["indicators"], services["trainer"], services["predictor"]
    admin = {"X-API-Key": KEYS["admin"]}

    # Bars to train on (a job for a series without bars is refused before anything is written).
    bars = bars_to_rows(generate_bars("H1", 300, seed=3))
    r = await ind.client.post(f"/v1/bars/{AUDIT_SYMBOL}/H1", json={"bars": bars}, headers=admin)
    assert r.status_code == 200, r.text

    series, _production_id, candidate_id = await with_connection(database_url, _two_versions)
    hook: dict[str, Any] = {}

    async def create_webhook() -> httpx.Response:
        r = await predictor.client.post(
            "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "series": [f"{AUDIT_SYMBOL}:H1"]}, headers=admin
        )
        hook.update(r.json())
        return r

    cases: list[tuple[tuple[str, str, str], str, Any]] = [
        (
            ("trainer", "POST", "/v1/jobs"),
            "job.create",
            lambda: trainer.client.post(
                "/v1/jobs", json={"kind": "train", "symbol": AUDIT_SYMBOL, "timeframe": "H1"}, headers=admin
            ),
        ),
        (
            ("trainer", "POST", "/v1/models/{model_id}/promote"),
            "model.promote",
            lambda: trainer.client.post(f"/v1/models/{candidate_id}/promote", json={"reason": "audit"}, headers=admin),
        ),
        (
            ("trainer", "POST", "/v1/models/{symbol}/{timeframe}/rollback"),
            "model.rollback",
            lambda: trainer.client.post(f"/v1/models/{series}/H1/rollback", headers=admin),
        ),
        (
            ("trainer", "PUT", "/v1/rollouts/{symbol}/{timeframe}"),
            "rollout.update",
            lambda: trainer.client.put(f"/v1/rollouts/{series}/H1", json={"shadow": True}, headers=admin),
        ),
        (("predictor", "POST", "/v1/webhooks"), "webhook.create", create_webhook),
        (
            ("predictor", "PATCH", "/v1/webhooks/{webhook_id}"),
            "webhook.pause",
            lambda: predictor.client.patch(f"/v1/webhooks/{hook['id']}", json={"paused": True}, headers=admin),
        ),
        (
            ("predictor", "PATCH", "/v1/webhooks/{webhook_id}"),
            "webhook.unpause",
            lambda: predictor.client.patch(f"/v1/webhooks/{hook['id']}", json={"paused": False}, headers=admin),
        ),
        (
            ("predictor", "DELETE", "/v1/webhooks/{webhook_id}"),
            "webhook.delete",
            lambda: predictor.client.delete(f"/v1/webhooks/{hook['id']}", headers=admin),
        ),
    ]
    assert {c[0] for c in cases} == admin_ops, "an admin action without an audit case (or a case for none)"
    for op, action, call in cases:
        before = await _audit_rows(database_url, action)
        r = await call()
        assert r.status_code < 300, f"{op}: {r.status_code} {r.text}"
        assert await _audit_rows(database_url, action) == before + 1, f"{op} left no {action} audit row"


async def _two_versions(conn: asyncpg.Connection) -> tuple[str, int, int]:
    """A series of its own with a production version and a candidate: (symbol, production id, candidate id)."""
    symbol = series_symbol("AUDM")
    first = await register_version(conn, symbol, 1)
    second = await register_version(conn, symbol, 2)
    assert first.status == "production" and second.status == "candidate"
    return symbol, first.id, second.id
