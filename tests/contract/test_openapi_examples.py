"""Every operation of the three services is documented for a reader of `/docs`: a summary, a description, an
example of its request body and of its success answer, and its error responses; and every example is true: it
validates against the schema it illustrates, and each request example, sent to the service, is accepted.

The documents are built by each service's `create_app` (what `/openapi.json` serves). The examples are validated
with jsonschema (Draft 2020-12, formats checked) against the document's own schemas, the way a client generated
from it reads them; the request examples are then sent in process to the three apps running their real
lifespans on the test run's PostgreSQL and Redis (tests/support/faults_apps.py), with the admin key.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from shared.errors import ERROR_REF
from tests.support.faults_apps import Service, operations, three_apps
from tests.support.keys import ADMIN_KEY

SERVICES = ("indicators", "trainer", "predictor")
# Answers whose body is not JSON: a PNG has no JSON example to show.
BINARY_MEDIA = {"image/png"}


@pytest.fixture(scope="module")
async def services(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Service]]:
    async with three_apps(database_url, redis_url, Path(tmp_path_factory.mktemp("openapi-examples"))) as apps:
        yield apps


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = doc["components"]["schemas"][name]
    return schema


def _examples(doc: dict[str, Any], media: dict[str, Any]) -> list[Any]:
    """The examples a reader of this media type sees: its own (`example`, `examples`) or, without them, those of
    its schema (or of the items of an array schema: Swagger UI builds the list from them)."""
    found: list[Any] = []
    if "example" in media:
        found.append(media["example"])
    found += [e["value"] for e in media.get("examples", {}).values()]
    if found:
        return found
    return _examples_of(doc, media.get("schema", {}))


def _examples_of(doc: dict[str, Any], schema: dict[str, Any]) -> list[Any]:
    schema = _resolve(doc, schema)
    if schema.get("type") == "array" and "items" in schema:
        return [[e] for e in _examples_of(doc, schema["items"])]
    if not _schema_examples(schema) and "anyOf" in schema:  # an optional body: `Model | None`
        return [e for branch in schema["anyOf"] for e in _examples_of(doc, branch)]
    return _schema_examples(schema)


def _schema_examples(schema: dict[str, Any]) -> list[Any]:
    return ([schema["example"]] if "example" in schema else []) + list(schema.get("examples", []))


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    # The document's components under the schema, so its `#/components/schemas/...` references resolve.
    return jsonschema.Draft202012Validator(
        {**schema, "components": doc["components"]}, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def _errors(doc: dict[str, Any], schema: dict[str, Any], example: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in _validator(doc, schema).iter_errors(example)
    ]


def _summary_missing(app: FastAPI) -> set[tuple[str, str]]:
    # FastAPI fills a missing summary with the function's name in title case ("Get Bars"): that says nothing.
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute) and route.include_in_schema and not route.summary
        for method in route.methods
    }


@pytest.mark.parametrize("name", SERVICES)
def test_every_operation_is_documented(services: dict[str, Service], name: str) -> None:
    app = services[name].app
    doc = app.openapi()
    missing: list[str] = [f"{m} {p}: no summary" for m, p in sorted(_summary_missing(app))]
    count = 0
    for method, path, op in operations(doc):
        count += 1
        where = f"{method} {path}"
        if not op.get("summary"):
            missing.append(f"{where}: no summary")
        if len(op.get("description", "")) < 20:
            missing.append(f"{where}: no description")
        body = op.get("requestBody")
        if body is not None:
            for media_type, media in body["content"].items():
                if not _examples(doc, media):
                    missing.append(f"{where}: no request example ({media_type})")
        successes = {c: r for c, r in op["responses"].items() if c.startswith("2")}
        if not successes:
            missing.append(f"{where}: no success response")
        for code, response in successes.items():
            for media_type, media in response.get("content", {}).items():
                if media_type not in BINARY_MEDIA and not _examples(doc, media):
                    missing.append(f"{where}: no example of its {code} answer ({media_type})")
        errors = {c: r for c, r in op["responses"].items() if c[0] in "45"}
        # Which codes each operation must list (401/403 with a key, 413 with a body, 422 with input) is
        # tests/contract/test_error_model.py's check; here: some are listed, each as an ErrorResponse.
        if "500" not in errors:
            missing.append(f"{where}: error responses undocumented")
        for code, response in errors.items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            if {"$ref": ERROR_REF} not in (schema, *schema.get("anyOf", [])):
                missing.append(f"{where}: its {code} is not an ErrorResponse")
    assert count >= 8
    assert not missing, "\n".join(missing)


def _all_examples(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(where, schema, example) of every example in the document: request bodies, answers, component schemas."""
    for method, path, op in operations(doc):
        media_items = [("request", m, media) for m, media in op.get("requestBody", {}).get("content", {}).items()]
        media_items += [
            (code, m, media) for code, r in op["responses"].items() for m, media in r.get("content", {}).items()
        ]
        for what, media_type, media in media_items:
            if media_type in BINARY_MEDIA:
                continue
            for i, example in enumerate(_examples(doc, media)):
                yield f"{method} {path} {what} example {i}", media.get("schema", {}), example
        for param in op.get("parameters", []):
            for i, example in enumerate([*_schema_examples(param), *param.get("schema", {}).get("examples", [])]):
                yield f"{method} {path} parameter {param['name']} example {i}", param["schema"], example
    for name, schema in doc["components"]["schemas"].items():
        for i, example in enumerate(_schema_examples(schema)):
            yield f"schema {name} example {i}", {"$ref": f"#/components/schemas/{name}"}, example


@pytest.mark.parametrize("name", SERVICES)
def test_every_example_validates_against_its_schema(services: dict[str, Service], name: str) -> None:
    doc = services[name].app.openapi()
    checked = 0
    wrong: list[str] = []
    for where, schema, example in _all_examples(doc):
        checked += 1
        wrong += [f"{where}: {e}" for e in _errors(doc, schema, example)]
    print(f"{name}: {checked} examples checked")
    assert checked >= 10
    assert not wrong, "\n".join(wrong)


def test_the_check_catches_a_wrong_example(services: dict[str, Service]) -> None:
    """The validation above is not vacuous: an answer example with a field of the wrong type is reported."""
    doc = services["trainer"].app.openapi()
    schema = doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]["content"]["application/json"]["schema"]
    assert _errors(doc, schema, {"job_id": "3f9a"}) == []
    assert _errors(doc, schema, {"job_id": 17}) == ["job_id: 17 is not of type 'string'"]
    assert _errors(doc, {"$ref": "#/components/schemas/ModelVersion"}, {"id": 1})  # required fields missing


# Path parameters of the request examples: a series the examples ingest first, ids nobody created (the
# operation then answers 404: the request was valid, the thing it names does not exist).
PATH_VALUES = {
    "symbol": "EURUSD",
    "timeframe": "H1",
    "model_id": "987654",
    "webhook_id": "987654",
    "prediction_id": str(uuid.UUID(int=1)),
}
# Request examples that need state these in-process apps lack: the error code they get, and why it is not the
# example's fault. Anything else that is refused fails the test.
NEEDS_STATE = {
    # the example's series must be served by a production model, and its host must resolve (no DNS here)
    ("predictor", "POST /v1/webhooks"): "validation_error",
    # a walk-forward validation needs thousands of stored bars (the detail says how many); the examples store two
    ("trainer", "POST /v1/jobs"): "not_enough_bars",
}
# The same, told by the detail: the example's candidate id (12) may by then be a model of another series, made
# by a test that ran earlier in the session (404 when nobody made one).
NEEDS_STATE_DETAIL = {("trainer", "PUT /v1/rollouts/{symbol}/{timeframe}"): ("validation_error", "belongs to")}


@pytest.mark.parametrize("name", SERVICES)
async def test_request_examples_are_accepted(services: dict[str, Service], name: str) -> None:
    """Each request-body example, sent as it is documented with the admin key, passes the service's validation:
    it is answered 2xx, or 404/409 for the thing it names (an id nobody created, a job of that kind already
    queued), never 422 or a 5xx."""
    service = services[name]
    doc = service.app.openapi()
    refused: list[str] = []
    sent = 0
    # Bars first: the other examples name the series these store.
    ops = sorted(operations(doc), key=lambda o: (o[1] != "/v1/bars/{symbol}/{timeframe}", o[1], o[0]))
    for method, path, op in ops:
        body = op.get("requestBody")
        if body is None:
            continue
        url = path.format(**PATH_VALUES)
        for example in _examples(doc, body["content"]["application/json"]):
            sent += 1
            r = await service.client.request(method, url, json=example, headers={"X-API-Key": ADMIN_KEY})
            code = NEEDS_STATE.get((name, f"{method} {path}"))
            if code is not None and r.status_code == 422:
                assert r.json()["error"] == code, r.text
                continue
            code, detail = NEEDS_STATE_DETAIL.get((name, f"{method} {path}"), (None, ""))
            if code is not None and r.status_code == 422 and r.json()["error"] == code and detail in r.text:
                continue
            if not (r.is_success or r.status_code in (404, 409)):
                refused.append(f"{method} {url} {example!r:.200}: {r.status_code} {r.text[:300]}")
    assert sent > 0
    assert not refused, "\n".join(refused)
