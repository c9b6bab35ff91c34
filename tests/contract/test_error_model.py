"""The one error model: every operation of every service documents `ErrorResponse` for its errors, and the
framework's own answers (unknown path, method not allowed, a body that is not JSON, request validation) have that
shape, so a client generated from the OpenAPI document parses every error it gets.

In process, on the test run's PostgreSQL and Redis (tests/support/faults_apps.py); 50 s measured on the loaded
2-core machine, most of it the three apps' start.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.errors import ERROR_REF, SYMBOL_SCHEMA, TIMEFRAME_SCHEMA, ErrorResponse
from tests.support.faults_apps import Service, operations, three_apps
from tests.support.keys import ADMIN_KEY

ADMIN = {"X-API-Key": ADMIN_KEY}


@pytest.fixture(scope="module")
async def services(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Service]]:
    async with three_apps(database_url, redis_url, Path(tmp_path_factory.mktemp("error-model"))) as apps:
        yield apps


def error_body(r: httpx.Response, status: int, code: str) -> ErrorResponse:
    """The response as the documented ErrorResponse, nothing more in it."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) <= {"error", "detail", "errors"}, body
    parsed = ErrorResponse.model_validate(body)
    assert parsed.error == code, body
    assert parsed.detail, body
    return parsed


@pytest.mark.parametrize("name", ["indicators", "trainer", "predictor"])
async def test_every_operation_documents_the_error_model(services: dict[str, Service], name: str) -> None:
    schema = services[name].app.openapi()
    assert "ErrorResponse" in schema["components"]["schemas"]
    text = json.dumps(schema)
    assert "HTTPValidationError" not in text, "FastAPI's default 422 model is never sent: it must not be documented"
    count = 0
    for method, path, op in operations(schema):
        count += 1
        responses: dict[str, Any] = op["responses"]
        expected = {"500", "503"}
        if op.get("security"):
            expected |= {"401", "403"}
        if "requestBody" in op:
            expected.add("413")
        if op.get("parameters") or "requestBody" in op:
            expected.add("422")
        assert expected <= set(responses), f"{method} {path}: {sorted(expected - set(responses))} undocumented"
        for code, response in responses.items():
            if code[0] in "45":
                # The one answer with a body of its own: readiness's 503 is its report (or, from the framework's
                # layers, the error model).
                own = [{"$ref": "#/components/schemas/Readiness"}] if (path, code) == ("/health/ready", "503") else []
                allowed = {"$ref": ERROR_REF} if not own else {"anyOf": [*own, {"$ref": ERROR_REF}]}
                assert response["content"]["application/json"]["schema"] == allowed, (method, path, code)
    assert count >= 8


@pytest.mark.parametrize(
    ("name", "method", "path"),
    [
        ("indicators", "get", "/v1/bars/{symbol}/{timeframe}"),
        ("indicators", "get", "/v1/indicators/{symbol}/{timeframe}"),
        ("trainer", "get", "/v1/rollouts/{symbol}/{timeframe}"),
        ("predictor", "get", "/v1/signals/{symbol}/{timeframe}"),
        ("predictor", "get", "/v1/performance"),
    ],
)
def test_handler_checked_parameters_are_in_the_schema(
    services: dict[str, Service], name: str, method: str, path: str
) -> None:
    op = services[name].app.openapi()["paths"][path][method]
    params = {p["name"]: p["schema"] for p in op["parameters"]}
    assert params["symbol"]["pattern"] == SYMBOL_SCHEMA["pattern"]
    timeframe = params["timeframe"]
    assert timeframe.get("enum") == TIMEFRAME_SCHEMA["enum"] or timeframe.get("$ref", "").endswith("/Timeframe")


async def test_unknown_path_is_a_404_in_the_error_model(services: dict[str, Service]) -> None:
    for service in services.values():
        error_body(await service.client.get("/v1/no-such-thing", headers=ADMIN), 404, "not_found")


async def test_405_names_every_method_of_the_path(services: dict[str, Service]) -> None:
    """/v1/jobs is two routes (GET lists, POST queues); Starlette alone answers `Allow: POST`."""
    r = await services["trainer"].client.delete("/v1/jobs", headers=ADMIN)
    error_body(r, 405, "method_not_allowed")
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
    r = await services["predictor"].client.put("/v1/webhooks/1", headers=ADMIN)
    error_body(r, 405, "method_not_allowed")
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "PATCH", "DELETE"}


@pytest.mark.parametrize("body", [b"\xff\xfe not utf-8", b'{"kind": "train",'], ids=["not-utf8", "bad-syntax"])
async def test_a_body_that_is_not_json_is_a_422(services: dict[str, Service], body: bytes) -> None:
    """Both on a route FastAPI parses (POST /v1/jobs) and on one that reads its own body (POST /v1/bars)."""
    headers = {**ADMIN, "Content-Type": "application/json"}
    r = await services["trainer"].client.post("/v1/jobs", content=body, headers=headers)
    error_body(r, 422, "validation_error")
    r = await services["indicators"].client.post("/v1/bars/CONTRACT/H1", content=body, headers=headers)
    error_body(r, 422, "validation_error")


async def test_request_validation_names_each_field(services: dict[str, Service]) -> None:
    r = await services["trainer"].client.get("/v1/jobs", params={"limit": "0"}, headers=ADMIN)
    parsed = error_body(r, 422, "validation_error")
    assert [e.loc for e in parsed.errors] == ["query.limit"]
    assert parsed.errors[0].input == "0"
